"""Decoding throughput of nmt's greedy and beam search, side by side with Hugging Face
``generate()`` on a MarianMTModel of the same shape (and optionally CTranslate2).

    python scripts/benchmark_decode.py --ckpt runs/base/checkpoints/best.pt [--device cuda] [--json out.json]

What is timed. For every system the same batches (nmt's length-sorted batches of the test
source, ``--batch-size`` sentences at most) go from token-id tensors to output token ids:
encoder, decoder steps, search bookkeeping. Tokenization and detokenization are left out. One
batch is decoded first as warm-up; CUDA is synchronised before each clock reading. Each system
makes ``--repeat`` passes, interleaved with the others', and its fastest pass counts (on a
shared machine the slow passes measure the neighbours). On a busy CPU use ``--threads`` no
larger than the idle cores: oversubscribed OpenMP threads make small models many times slower.
On CPU the process keeps freed memory in glibc's heap, as ``python -m nmt.translate`` does
(``nmt.runtime.keep_freed_memory_in_heap``); it applies to every system alike, and
``--malloc default`` turns it off.

Workers. On CPU nmt decodes ``--workers`` batches at once, each on its own thread with an equal
share of the ``--threads`` (``decode.workers``, as ``python -m nmt.translate`` does; the default 0
gives one worker per thread). CTranslate2 gets the same split (``inter_threads`` workers of
``intra_threads`` each), since it offers the same. ``generate()`` has nothing like it and decodes
one batch at a time on all the threads, as a user would run it. ``--workers 1`` times nmt that way
too; ``--hf-workers`` runs ``generate()`` with nmt's workers instead, to compare the two on equal
terms.

Equal work. The Marian model has random weights, so left alone it would stop at arbitrary
lengths. Instead each batch is decoded by nmt first, counting its decoder steps S_b (the
number of ``decode`` calls: the longest sentence of the batch, EOS included; with beam search,
the step at which the last sentence of the batch collected its finished hypotheses). The other
systems then decode that batch for exactly S_b steps (``min_new_tokens = max_new_tokens = S_b``
for generate, ``min/max_decoding_length`` for CTranslate2). "tokens/s" divides the same count
for every system: the target tokens nmt produced, EOS included. nmt drops finished sentences
from its batch; generate keeps decoding them until the batch's longest is done, as it would
with a trained model, and that difference is part of what is measured.

Model differences (nmt vs Marian). Same vocabulary, d_model, heads, feed-forward size, layers,
activation, sinusoidal positions, sqrt(d) embedding scale, tied/shared embeddings as the
checkpoint says. Marian is post-norm and adds a final-logits bias; nmt's default is pre-norm
with a final LayerNorm in each stack (one LayerNorm more per stack). Marian's attention is SDPA; nmt's
is SDPA too, except on CPU with several queries over at most 64 keys (encoder self-attention, beam
search's grouped cross-attention), where plain matmuls are faster (``nmt.model.attention``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from nmt.config import DataConfig
from nmt.data.tokenizer import EOS_ID
from nmt.device import device_name
from nmt.runtime import keep_freed_memory_in_heap
from nmt.search import beam_search, greedy_search
from nmt.translator import Translator

log = logging.getLogger("benchmark_decode")


@dataclass
class Result:
    system: str
    search: str
    sentences: int
    target_tokens: int  # nmt's output tokens incl. EOS: the same numerator for every system
    seconds: float
    sentences_per_s: float
    tokens_per_s: float
    decoder_steps: int  # summed over batches
    pass_seconds: list[float]  # every timed pass, in order; ``seconds`` is the fastest


@dataclass
class Batch:
    src: torch.Tensor  # (B, S) on the device
    mask: torch.Tensor  # (B, S) True = real token
    steps: int = 0  # decoder steps nmt needed
    tokens: int = 0  # nmt's output tokens, EOS included


Runner = Callable[[list[Batch]], None]  # decodes all the batches it is given


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="trained nmt checkpoint")
    p.add_argument(
        "--data-dir", default=DataConfig.dir, help="folder with SPLIT.LANG[.gz] (default: data.dir's)"
    )
    p.add_argument("--split", default="test_2016_flickr")
    p.add_argument("--src-lang", help="default: the checkpoint's data.src_lang")
    p.add_argument("--limit", type=int, default=0, help="use only the first N sentences (0 = all)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch")
    p.add_argument(
        "--workers",
        type=int,
        help="CPU: batches nmt and CTranslate2 decode at once (default: the checkpoint's decode.workers; "
        "0 = one per thread)",
    )
    p.add_argument("--beams", default="1,5", help="comma-separated beam sizes (1 = greedy)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers generate()")
    p.add_argument(
        "--hf-workers",
        action="store_true",
        help="run generate() with nmt's workers too (several batches at once on CPU, which generate() "
        "itself does not do)",
    )
    p.add_argument(
        "--ctranslate2", action="store_true", help="also time CTranslate2 on the converted Marian model"
    )
    p.add_argument("--repeat", type=int, default=3, help="timed passes per system; the fastest counts")
    p.add_argument(
        "--malloc",
        choices=("heap", "default"),
        default="heap",
        help="heap: glibc keeps freed memory for reuse, as python -m nmt.translate sets it on CPU (the "
        "whole process, so every system); default: glibc's defaults",
    )
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def read_source(data_dir: Path, split: str, lang: str, limit: int) -> list[str]:
    for path in (data_dir / f"{split}.{lang}.gz", data_dir / f"{split}.{lang}"):
        if path.exists():
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as f:
                lines = [line.rstrip("\n") for line in f]
            return lines[:limit] if limit else lines
    sys.exit(f"benchmark_decode: no {split}.{lang}[.gz] in {data_dir}; pass --data-dir")


def make_batches(translator: Translator, sentences: list[str]) -> list[Batch]:
    source = translator.encode(sentences)
    groups = translator.batches({i: len(ids) for i, ids in source.items()})
    return [Batch(*translator.collate([source[i] for i in group])) for group in groups]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(run: Runner, batches: list[Batch], device: torch.device) -> float:
    """Seconds to run ``run(batches)``, after one warm-up batch."""
    run(batches[:1])
    sync(device)
    start = time.perf_counter()
    run(batches)
    sync(device)
    return time.perf_counter() - start


def decode_all(translator: Translator, decode: Callable[[Batch], None], batches: list[Batch]) -> None:
    """``decode`` every batch through ``Translator.batch_map``: several at once on CPU, as in
    ``python -m nmt.translate``."""
    with translator.batch_map(len(batches)) as map_batches:
        for _ in map_batches(decode, batches):
            pass


def nmt_runner(translator: Translator, beam: int) -> Runner:
    """Decode with nmt (through :func:`decode_all`), recording each batch's decoder steps and
    output tokens."""
    model, cfg = translator.model, translator.decode_cfg
    # As the translator decodes: outputs also capped by the model's positions, the searches' default.
    lengths = dict(max_len_a=cfg.max_len_a, max_len_b=cfg.max_len_b, min_len=cfg.min_len)
    decode = type(model).decode.__get__(model)  # the method, not an earlier wrapper
    counter = threading.local()  # decoder calls of the batch this thread is decoding

    def counting_decode(*args, **kwargs):
        counter.calls = getattr(counter, "calls", 0) + 1
        return decode(*args, **kwargs)

    model.decode = counting_decode  # an instance attribute shadows the method; costs one call

    def search(batch: Batch) -> None:
        counter.calls = 0
        if beam == 1:
            outputs = greedy_search(model, batch.src, batch.mask, **lengths)
        else:
            hyps = beam_search(model, batch.src, batch.mask, beam, cfg.len_penalty, **lengths)
            outputs = [h[0].tokens for h in hyps]
        batch.steps, batch.tokens = counter.calls, sum(len(t) + 1 for t in outputs)

    return lambda batches: decode_all(translator, search, batches)


def marian_like(translator: Translator, dtype: torch.dtype):
    """A randomly initialised MarianMTModel with the checkpoint model's shape.

    Marian's convention is kept: one extra vocabulary entry at the end for its own padding token,
    from whose (zero) embedding the decoder starts (CTranslate2's converter relies on it). nmt's
    ids keep their meaning, EOS included; the one extra output row costs nothing measurable.
    """
    from transformers import MarianConfig, MarianMTModel

    cfg, tok = translator.model.cfg, translator.tokenizer
    marian_pad = tok.tgt_vocab_size
    config = MarianConfig(
        vocab_size=tok.src_vocab_size + 1,
        decoder_vocab_size=tok.tgt_vocab_size + 1,
        d_model=cfg.d_model,
        encoder_layers=cfg.enc_layers,
        decoder_layers=cfg.dec_layers,
        encoder_attention_heads=cfg.n_heads,
        decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.ffn_dim,
        decoder_ffn_dim=cfg.ffn_dim,
        activation_function=cfg.activation,
        max_position_embeddings=cfg.max_positions,
        dropout=0.0,
        scale_embedding=True,
        share_encoder_decoder_embeddings=cfg.share_embeddings,
        tie_word_embeddings=cfg.tie_output,
        pad_token_id=marian_pad,
        eos_token_id=EOS_ID,
        decoder_start_token_id=marian_pad,
        forced_eos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return MarianMTModel(config).eval().to(device=translator.device, dtype=dtype)


def hf_runner(marian, beam: int, translator: Translator | None = None) -> Runner:
    """``generate()`` one batch at a time, or, given ``translator``, through :func:`decode_all` like
    nmt (several batches at once on CPU: not something ``generate()`` offers, but a user could)."""
    from transformers import GenerationConfig

    def run(batches: list[Batch]) -> None:
        if translator is None:
            for batch in batches:
                generate(batch)
        else:
            decode_all(translator, generate, batches)

    def generate(batch: Batch) -> None:
        # generate's first decoder step reads the start token, like nmt's BOS step: S_b steps.
        gen = GenerationConfig(
            num_beams=beam,
            do_sample=False,
            min_new_tokens=batch.steps,
            max_new_tokens=batch.steps,
            decoder_start_token_id=marian.config.decoder_start_token_id,
            eos_token_id=EOS_ID,
            pad_token_id=marian.config.pad_token_id,
            use_cache=True,
        )
        with torch.inference_mode():
            marian.generate(input_ids=batch.src, attention_mask=batch.mask, generation_config=gen)

    return run


def ctranslate2_runner(marian, translator: Translator, beam: int, workdir: Path, workers: int) -> Runner:
    """CTranslate2 on the same Marian weights; tokens are passed as SentencePiece piece strings.

    ``workers`` batches run at once (``inter_threads``), sharing the threads as nmt's workers do.
    """
    import ctranslate2

    model_dir = workdir / "ct2"
    if not (model_dir / "model.bin").exists():
        convert_to_ctranslate2(marian, translator, workdir, model_dir)
    device = translator.device
    dtype = next(translator.model.parameters()).dtype
    threads = torch.get_num_threads()
    ct2 = ctranslate2.Translator(
        str(model_dir),
        device=device.type,
        device_index=device.index or 0,
        compute_type={torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype],
        inter_threads=workers,
        intra_threads=max(1, threads // workers),
    )
    # CTranslate2 sets OpenMP's thread count of the calling thread to intra_threads, which is also
    # torch's: give the other systems their threads back.
    torch.set_num_threads(threads)
    pieces = _piece_table(translator)

    def run(batches: list[Batch]) -> None:
        pending = []  # with asynchronous=True each call returns at once; the workers take the batches
        for batch in batches:
            src = [[pieces[i] for i in row[row != 0].tolist()] for row in batch.src.cpu()]
            pending += ct2.translate_batch(
                src,
                beam_size=beam,
                min_decoding_length=batch.steps,
                max_decoding_length=batch.steps,
                max_batch_size=len(src),
                asynchronous=True,
            )
        for result in pending:
            result.result()

    return run


def _piece_table(translator: Translator) -> list[str]:
    """Piece string of every source id (CTranslate2 takes tokens as strings)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=translator.tokenizer.state_dict()["src_model"])
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def convert_to_ctranslate2(marian, translator: Translator, workdir: Path, model_dir: Path) -> None:
    """Save the Marian model with a MarianTokenizer built from nmt's SentencePiece model, then convert."""
    import ctranslate2

    hf_dir = workdir / "marian"
    marian.to(torch.float32).cpu().save_pretrained(hf_dir)
    state = translator.tokenizer.state_dict()
    (hf_dir / "source.spm").write_bytes(state["src_model"])
    (hf_dir / "target.spm").write_bytes(state.get("tgt_model", state["src_model"]))
    # nmt's id 0 is SentencePiece's "<pad>"; Marian's own "<pad>" is the extra last entry.
    pieces = ["<nmt_pad>", *_piece_table(translator)[1:], "<pad>"]
    (hf_dir / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(pieces)}))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "MarianTokenizer"}))
    ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(str(model_dir), force=True)
    marian.to(translator.device)


def result(system: str, beam: int, batches: list[Batch], passes: list[float]) -> Result:
    sentences, tokens = sum(b.src.size(0) for b in batches), sum(b.tokens for b in batches)
    seconds = min(passes)
    return Result(
        system=system,
        search="greedy" if beam == 1 else f"beam {beam}",
        sentences=sentences,
        target_tokens=tokens,
        seconds=round(seconds, 3),
        sentences_per_s=round(sentences / seconds, 1),
        tokens_per_s=round(tokens / seconds, 1),
        decoder_steps=sum(b.steps for b in batches),
        pass_seconds=[round(p, 3) for p in passes],
    )


def print_table(results: list[Result]) -> None:
    header = (
        f"{'system':<14}{'search':<9}{'sentences':>10}{'tokens':>9}{'seconds':>9}{'sent/s':>9}{'tok/s':>10}"
        "  all passes (s)"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.system:<14}{r.search:<9}{r.sentences:>10}{r.target_tokens:>9}{r.seconds:>9.2f}"
            f"{r.sentences_per_s:>9.1f}{r.tokens_per_s:>10.1f}  {' '.join(f'{p:.2f}' for p in r.pass_seconds)}"
        )


def runners(
    args, translator: Translator, marian, beam: int, workdir: Path, workers: int
) -> dict[str, Runner]:
    """The systems to time at this beam size; nmt first, since it sets each batch's step count."""
    systems = {"nmt": nmt_runner(translator, beam)}
    if not args.no_hf:
        systems["transformers"] = hf_runner(marian, beam, translator if args.hf_workers else None)
    if args.ctranslate2:
        try:
            systems["ctranslate2"] = ctranslate2_runner(marian, translator, beam, workdir, workers)
        except Exception as e:  # noqa: BLE001 - an optional system: say why and go on
            log.warning("CTranslate2 skipped: %s: %s", type(e).__name__, e)
    return systems


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark; returns the report that ``--json`` writes."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    translator = Translator.from_checkpoint(args.ckpt, device=args.device, dtype=args.dtype)
    heap = translator.device.type == "cpu" and args.malloc == "heap" and keep_freed_memory_in_heap()
    # Batches capped by sentence count only, the same for every system.
    translator.decode_cfg = replace(translator.decode_cfg, batch_size=args.batch_size, max_tokens=10**9)
    if args.workers is not None:
        translator.decode_cfg = replace(translator.decode_cfg, workers=args.workers)
    device, dtype = translator.device, next(translator.model.parameters()).dtype
    src_lang = args.src_lang or _checkpoint_src_lang(args.ckpt)
    batches = make_batches(translator, read_source(Path(args.data_dir), args.split, src_lang, args.limit))
    workers = translator.workers(len(batches))  # nmt's, and CTranslate2's inter_threads
    marian = None if args.no_hf and not args.ctranslate2 else marian_like(translator, dtype)
    workdir = Path(tempfile.mkdtemp(prefix="benchmark_decode."))  # CTranslate2's converted model
    results: list[Result] = []
    for beam in [int(b) for b in args.beams.split(",")]:
        systems = runners(args, translator, marian, beam, workdir, workers)
        passes: dict[str, list[float]] = {name: [] for name in systems}
        for _ in range(args.repeat):  # interleaved, so that a busy moment hurts all systems alike
            for name, run in systems.items():
                passes[name].append(timed(run, batches, device))
        results += [result(name, beam, batches, seconds) for name, seconds in passes.items()]
        print_table(results)
    meta = {
        "device": str(device) if device.type == "cpu" else device_name(device),
        "cpu": device_name(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "workers": workers,  # nmt's and CTranslate2's
        "hf_workers": workers if args.hf_workers else 1,
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "malloc": "heap" if heap else "default",
        "model": asdict(translator.model.cfg),
        "decode": asdict(translator.decode_cfg),
        "parameters": translator.model.num_parameters(),
    }
    if marian is not None:
        import transformers

        meta["transformers"] = transformers.__version__
        meta["marian_parameters"] = sum(p.numel() for p in marian.parameters())
    keys = ("device", "threads", "workers", "dtype", "parameters", "repeat", "malloc")
    print(json.dumps({k: meta[k] for k in keys}))
    report = {"meta": meta, "results": [asdict(r) for r in results]}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def _checkpoint_src_lang(path: str) -> str:
    from nmt.checkpoint import config_from_checkpoint, load_checkpoint

    return config_from_checkpoint(load_checkpoint(path)).data.src_lang


if __name__ == "__main__":
    main()
