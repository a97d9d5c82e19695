"""Corpus-level sacreBLEU BLEU and chrF: detokenized strings in, scores and signatures out.

BLEU uses sacreBLEU's defaults (13a tokenizer, exponential smoothing, cased). Published Multi30k
results are usually lowercased BLEU: pass ``lowercase=True``. As with ``sacrebleu -lc`` it
lowercases BLEU only; chrF stays cased. The signatures record the choice: quote them with the
numbers.

    python -m nmt.evaluate --hyp hyp.de --ref test_2016_flickr.de.gz [--lowercase]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from sacrebleu.metrics import BLEU, CHRF

from nmt.data.sources import read_text_lines


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


def score(hyps: list[str], refs: list[str], lowercase: bool = False) -> Scores:
    """Corpus BLEU and chrF of ``hyps`` against one reference per line."""
    if len(hyps) != len(refs):
        raise ValueError(
            f"{len(hyps)} hypotheses but {len(refs)} references; they must be aligned line by line."
        )
    if not hyps:
        raise ValueError("nothing to score: no hypotheses and no references.")
    bleu, chrf = BLEU(lowercase=lowercase), CHRF()
    bleu_score = bleu.corpus_score(hyps, [refs])
    chrf_score = chrf.corpus_score(hyps, [refs])
    return Scores(
        bleu=bleu_score.score,
        chrf=chrf_score.score,
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
        bleu_detail=str(bleu_score),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nmt.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hyp", required=True, help="system output, one sentence per line")
    parser.add_argument("--ref", required=True, help="reference translations, one per line (.gz allowed)")
    parser.add_argument("--lowercase", action="store_true", help="lowercased BLEU (chrF stays cased)")
    args = parser.parse_args(argv)
    try:
        scores = score(read_text_lines(args.hyp), read_text_lines(args.ref), lowercase=args.lowercase)
    except (OSError, ValueError) as e:
        parser.exit(1, f"nmt.evaluate: error: {e}\n")
    print(scores.bleu_detail)
    print(scores.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
