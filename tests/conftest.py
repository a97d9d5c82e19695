"""Shared fixtures: a toy parallel corpus, tiny configs, the Multi30k location."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from nmt.config import Config, DataConfig, DecodeConfig, ModelConfig, TrainConfig
from tests.data_fixtures import multi30k_dir, multi30k_missing

REPO = Path(__file__).resolve().parents[1]
MULTI30K = multi30k_dir()  # None when absent

SRC_WORDS = "a the man woman dog cat red blue big small runs sits eats sees park street ball house".split()
# A word-for-word "translation" keeps the toy task learnable by a tiny model in a few hundred steps.
TGT_WORDS = (
    "ein der mann frau hund katze rot blau gross klein rennt sitzt isst sieht park strasse ball haus".split()
)
LEXICON = dict(zip(SRC_WORDS, TGT_WORDS))


def files_limited_to(size: int):
    """A ``preexec_fn`` for a child process that may not grow any file past ``size`` bytes: its writes
    fail (EFBIG, "File too large") as they would on a full disk, without a full disk to make."""
    import resource
    import signal

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def toy_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        words = [rng.choice(SRC_WORDS) for _ in range(rng.randint(2, 9))]
        pairs.append((" ".join(words), " ".join(LEXICON[w] for w in words)))
    return pairs


def write_toy_corpus(
    directory: Path, src: str = "en", tgt: str = "de", n_train: int = 400, n_valid: int = 40
) -> Path:
    """Plain parallel files DIR/{train,val,test}.{src,tgt}."""
    directory.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("val", n_valid, 1), ("test", n_valid, 2)):
        pairs = toy_pairs(n, seed)
        (directory / f"{split}.{src}").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
        (directory / f"{split}.{tgt}").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    return directory


def tiny_config(data_dir: Path, run_dir: Path, **train_overrides) -> Config:
    """A configuration that trains on the toy corpus in seconds on one CPU core."""
    train = dict(
        seed=3,
        device="cpu",
        lr=3e-3,
        warmup_steps=10,
        max_steps=12,
        valid_every=1000,
        log_every=4,
        keep_last=3,
        num_samples=1,
    )
    train.update(train_overrides)
    return Config(
        name="tiny",
        run_dir=str(run_dir),
        data=DataConfig(
            dir=str(data_dir),
            src_lang="en",
            tgt_lang="de",
            test="test",
            download="",
            vocab_size=100,
            max_len=32,
            max_tokens=200,
            cache_dir=str(data_dir / ".cache"),
        ),
        model=ModelConfig(
            d_model=32,
            n_heads=4,
            enc_layers=1,
            dec_layers=1,
            ffn_dim=64,
            dropout=0.1,
            max_positions=64,
        ),
        train=TrainConfig(**train),
        decode=DecodeConfig(beam=2, max_len_a=1.0, max_len_b=5, batch_size=32),
    )


@pytest.fixture
def toy_dir(tmp_path: Path) -> Path:
    return write_toy_corpus(tmp_path / "toy")


@pytest.fixture(name="multi30k_dir")
def multi30k_dir_fixture() -> Path:
    if MULTI30K is None:
        pytest.skip(multi30k_missing())
    return MULTI30K


@pytest.fixture
def cudnn_attention_restored():
    """Tests that switch SDPA's cuDNN kernels give the process its setting back."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.fixture
def torch_threads():
    """Runs the test with 4 torch threads (what a 4-core machine has); restores the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield 4
    torch.set_num_threads(before)


@pytest.fixture
def traced_graphs(monkeypatch):
    """``torch.compile`` with the aot_eager backend, which traces the forward and backward graphs as
    inductor would without generating code; yields the list of the graphs it was given. Traces afresh
    (dynamo reset, no on-disk cache: a cached graph brings the guards it was first compiled with)."""
    import torch._dynamo
    import torch._functorch.config

    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return aot_eager(graph, example_inputs)

    compile_ = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda fn, **kw: compile_(fn, **{**kw, "backend": counting_backend})
    )
    with torch._functorch.config.patch(enable_autograd_cache=False):
        torch._dynamo.reset()
        yield graphs
        torch._dynamo.reset()
