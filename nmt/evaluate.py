"""Corpus-level sacreBLEU BLEU and chrF: detokenized strings in, scores and signatures out.

BLEU uses sacreBLEU's defaults (exponential smoothing, cased) and its tokenizer for the target
language, as ``sacrebleu -l SRC-TGT`` picks it: 13a, but ``zh`` for Chinese, ``ja-mecab`` for Japanese
and ``ko-mecab`` for Korean (those two need ``pip install "sacrebleu[ja]"`` or ``"sacrebleu[ko]"``);
13a splits no Chinese or Japanese words, and would score a near-perfect Chinese translation near 0.
``tokenize`` names another (``intl``, ``char``, ``flores200``, ...). Published Multi30k results are
usually lowercased BLEU: pass ``lowercase=True``. As with ``sacrebleu -lc`` it lowercases BLEU only;
chrF stays cased. The signatures record every choice: quote them with the numbers. Scores equal
``sacrebleu REF -i HYP -m bleu chrf`` but for one case: a UTF-8 byte-order mark that starts a file is
dropped here, where sacreBLEU's command line keeps it as part of the first word.

    python -m nmt.evaluate --hyp hyp.de --ref test_2016_flickr.de.gz [--lowercase] [--tgt-lang zh]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.metrics import bleu as bleu_module

from nmt.data.sources import read_errors_named, read_text_lines, text_lines

if TYPE_CHECKING:
    from nmt.config import Config


@dataclass
class Scores:
    bleu: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    bleu_detail: str  # "BLEU = 35.1 66.2/41.0/... (BP = ...)": n-gram precisions and brevity penalty

    def format(self) -> str:
        """One human-readable line with both scores and their signatures."""
        return f"BLEU {self.bleu:.2f} ({self.bleu_signature}) | chrF {self.chrf:.2f} ({self.chrf_signature})"


def bleu_options(cfg: Config | None) -> dict[str, str]:
    """How a run's BLEU is tokenized (validation, ``nmt.translate --ref``, the recipe): its
    ``train.bleu_tokenize`` for its ``data.tgt_lang``; without a config, 13a."""
    if cfg is None:
        return {"tokenize": "auto", "tgt_lang": ""}
    return {"tokenize": cfg.train.bleu_tokenize, "tgt_lang": cfg.data.tgt_lang}


def _language(tgt_lang: str) -> str:
    """The primary language subtag, as sacreBLEU's table has it: zh-CN, zh_Hans -> zh."""
    return tgt_lang.strip().lower().replace("_", "-").split("-")[0]


def bleu_tokenizer(tokenize: str, tgt_lang: str) -> str:
    """The sacreBLEU tokenizer ``tokenize`` means: itself, or for "auto" sacreBLEU's own choice for the
    target language (``BLEU(trg_lang=...)``: 13a, zh, ja-mecab, ko-mecab)."""
    if tokenize != "auto":
        return tokenize
    return getattr(BLEU, "_TOKENIZER_MAP", {}).get(_language(tgt_lang), BLEU.TOKENIZER_DEFAULT)


def bleu_metric(lowercase: bool = False, tokenize: str = "auto", tgt_lang: str = "") -> BLEU:
    """sacreBLEU's BLEU with :func:`bleu_tokenizer` (``tgt_lang``: a language code such as ``de`` or
    ``zh-CN``). A tokenizer that does not exist or cannot run is a ValueError."""
    try:
        return BLEU(
            lowercase=lowercase, tokenize=bleu_tokenizer(tokenize, tgt_lang), trg_lang=_language(tgt_lang)
        )
    except KeyError:
        names = ", ".join(["auto", *sorted(getattr(bleu_module, "_TOKENIZERS", {}))])
        raise ValueError(f"BLEU has no tokenizer {tokenize!r}; choose one of: {names}.") from None
    except RuntimeError as e:  # ja-mecab, ko-mecab without their packages; sacreBLEU's last line: pip ...
        install = str(e).strip().splitlines()[-1].strip()
        raise ValueError(
            f"{_which(tokenize, tgt_lang)} needs packages that are not installed: {install} (or choose "
            "another tokenizer)."
        ) from None
    except OSError as e:  # spm, flores101, flores200 download their SentencePiece model on first use
        reason = getattr(e, "reason", None) or e
        raise ValueError(
            f"{_which(tokenize, tgt_lang)} downloads its SentencePiece model on first use, which failed "
            f"({reason}); choose another tokenizer."
        ) from None


def _which(tokenize: str, tgt_lang: str) -> str:
    if tokenize == "auto":
        return f"BLEU's tokenizer for target language {tgt_lang!r}"
    return f"BLEU's tokenizer {tokenize!r}"


def score(
    hyps: list[str], refs: list[str], lowercase: bool = False, tokenize: str = "auto", tgt_lang: str = ""
) -> Scores:
    """Corpus BLEU and chrF of ``hyps`` against one reference per line; BLEU as :func:`bleu_metric`."""
    if len(hyps) != len(refs):
        raise ValueError(
            f"{len(hyps)} hypotheses but {len(refs)} references; they must be aligned line by line."
        )
    if not hyps:
        raise ValueError("nothing to score: no hypotheses and no references.")
    bleu, chrf = bleu_metric(lowercase, tokenize, tgt_lang), CHRF()
    bleu_score = bleu.corpus_score(hyps, [refs])
    chrf_score = chrf.corpus_score(hyps, [refs])
    return Scores(
        bleu=bleu_score.score,
        chrf=chrf_score.score,
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
        bleu_detail=str(bleu_score),
    )


class GivenOnce(argparse.Action):
    """A flag that names one file: given twice, an error (not the last one silently), since
    ``--ref a --ref b`` reads as two references to a sacreBLEU user."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: Any, value: Any, option: Any = None
    ) -> None:
        if getattr(namespace, self.dest, None) is not None:
            parser.error(f"{option} is given twice ({getattr(namespace, self.dest)}, {value}); give it once.")
        setattr(namespace, self.dest, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nmt.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hyp",
        required=True,
        action=GivenOnce,
        help="system output, one sentence per line; - = standard input",
    )
    parser.add_argument(
        "--ref", required=True, action=GivenOnce, help="reference translations, one per line (.gz allowed)"
    )
    parser.add_argument("--lowercase", action="store_true", help="lowercased BLEU (chrF stays cased)")
    parser.add_argument(
        "--tgt-lang", default="", help="the references' language (e.g. de, zh): picks BLEU's tokenizer"
    )
    parser.add_argument(
        "--tokenize", default="auto", help="BLEU's tokenizer: auto (by --tgt-lang; 13a), or a sacreBLEU name"
    )
    args = parser.parse_args(argv)
    try:
        if args.hyp == "-":  # read as a file is
            with read_errors_named("standard input"):
                hyps = text_lines(sys.stdin.buffer.read(), "standard input")
        else:
            hyps = read_text_lines(args.hyp)
        refs = read_text_lines(args.ref)
        scores = score(hyps, refs, args.lowercase, args.tokenize, args.tgt_lang)
    except (OSError, ValueError) as e:
        parser.exit(1, f"nmt.evaluate: error: {e}\n")
    print(scores.bleu_detail)
    print(scores.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
