"""Typed configuration: the one place where defaults live.

Hydra composes YAML from ``configs/`` on top of these dataclasses (registered as the schema
``base_config``), so a misspelled key is an error. Entry points turn the composed config into
plain dataclasses once with :func:`to_config`; nothing below the CLI sees a ``DictConfig``.
Each value is checked in its section's ``__post_init__``, before any expensive work; what only
training needs (values across sections, and a few single ones a checkpoint may hold otherwise) is
checked in :meth:`Config.check_for_training`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and how to fix it."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name when it has none: for one-line errors."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    choices = ", ".join(repr(a) if a else "'' (off)" for a in allowed)
    _check(value in allowed, f"{name}={value!r} is not valid; choose one of {choices}.")


@dataclass
class DataConfig:
    # Where the corpus lives. For format=text the files are DIR/{split}.{lang}[.gz].
    dir: str = "data/multi30k"
    src_lang: str = "en"
    tgt_lang: str = "de"
    # text: PREFIX.SRC / PREFIX.TGT; tsv: DIR/{split}.tsv (src<TAB>tgt); jsonl: DIR/{split}.jsonl;
    # hub: a dataset on the Hugging Face hub (hub_name / hub_config), needs network.
    format: str = "text"
    train: str = "train"
    valid: str = "val"
    test: str = "test_2016_flickr"
    hub_name: str = ""
    hub_config: str = ""
    # If the text files are missing: "multi30k" downloads them, "" fails with a clear message.
    download: str = "multi30k"
    # Use only the first N pairs of a split (0 = all). For smoke runs and quick experiments.
    train_limit: int = 0
    valid_limit: int = 0
    # SentencePiece
    vocab_size: int = 8000
    joint_vocab: bool = True
    spm_model_type: str = "unigram"
    character_coverage: float = 1.0
    # Filtering of the training split (validation and test are never filtered).
    max_len: int = 128
    max_len_ratio: float = 3.0
    # Batching: a batch holds at most max_tokens padded tokens on its longer side.
    max_tokens: int = 4096
    # Where tokenizers and encoded Arrow caches are kept between runs ("" = DIR/.cache).
    cache_dir: str = ""

    def __post_init__(self) -> None:
        _one_of("data.format", self.format, ("text", "tsv", "jsonl", "hub"))
        _one_of("data.download", self.download, ("", "multi30k"))
        _one_of("data.spm_model_type", self.spm_model_type, ("unigram", "bpe"))
        _check(bool(self.src_lang) and bool(self.tgt_lang), "data.src_lang and data.tgt_lang must be set.")
        _check(self.src_lang != self.tgt_lang, "data.src_lang and data.tgt_lang must differ.")
        _check(self.format != "hub" or bool(self.hub_name), "data.format=hub needs data.hub_name.")
        _check(self.train_limit >= 0 and self.valid_limit >= 0, "data.train_limit/valid_limit must be >= 0.")
        _check(
            100 <= self.vocab_size <= 1_000_000,
            f"data.vocab_size={self.vocab_size} must be in [100, 1000000].",
        )
        _check(0.9 <= self.character_coverage <= 1.0, "data.character_coverage must be in [0.9, 1.0].")
        _check(2 <= self.max_len <= 100_000, f"data.max_len={self.max_len} must be in [2, 100000].")
        _check(self.max_len_ratio >= 1.0, f"data.max_len_ratio={self.max_len_ratio} must be >= 1.")
        _check(
            self.max_tokens >= self.max_len + 1,
            f"data.max_tokens={self.max_tokens} must be at least data.max_len + 1 = {self.max_len + 1} "
            "(the longest kept sentence with its EOS or BOS), so that it fits in a batch.",
        )


@dataclass
class ModelConfig:
    # These are the default model group's (configs/model/small.yaml), but for its higher dropouts.
    d_model: int = 256
    n_heads: int = 4
    enc_layers: int = 3
    dec_layers: int = 3
    ffn_dim: int = 1024
    dropout: float = 0.1  # on residual branches and embeddings
    attn_dropout: float = 0.0  # on attention probabilities
    act_dropout: float = 0.0  # after the feed-forward activation
    activation: str = "relu"
    norm_first: bool = True  # pre-norm (with a final LayerNorm); false = post-norm
    positions: str = "sinusoidal"  # or "learned"
    max_positions: int = 1024
    tie_output: bool = True  # decoder input embedding == output projection
    share_embeddings: bool = True  # source embedding == target embedding (needs a joint vocabulary)

    def __post_init__(self) -> None:
        _one_of("model.activation", self.activation, ("relu", "gelu"))
        _one_of("model.positions", self.positions, ("sinusoidal", "learned"))
        for name in ("d_model", "n_heads", "ffn_dim", "max_positions"):
            value = getattr(self, name)
            _check(0 < value <= 1_000_000, f"model.{name}={value} must be a positive integer.")
        for name in ("enc_layers", "dec_layers"):  # deeper than the deepest published (1,000 layers in all)
            value = getattr(self, name)
            _check(0 < value <= 1000, f"model.{name}={value} must be in [1, 1000].")
        _check(
            self.d_model % self.n_heads == 0,
            f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}.",
        )
        for name in ("dropout", "attn_dropout", "act_dropout"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, f"model.{name}={value} must be in [0, 1).")


@dataclass
class TrainConfig:
    seed: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # auto = bf16 on CUDA (fp16 on GPUs without bf16), fp32 on CPU | fp32 | bf16 | fp16
    precision: str = "auto"
    # torch.compile the encoder and decoder layers for training (nmt.runtime.compile_model), and the loss
    # where it is computed from logits: GPU, or CPU in bf16 (compile_loss)
    compile: bool = False
    # optimisation
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    schedule: str = "inverse_sqrt"  # or "cosine"
    warmup_steps: int = 1000
    min_lr: float = 0.0  # floor of the cosine schedule
    accum_steps: int = 1
    clip_norm: float = 1.0  # 0 disables clipping
    label_smoothing: float = 0.1
    # stopping
    max_steps: int = 10_000
    max_epochs: int = 0  # 0 = no limit
    max_time_min: float = 0.0  # wall-clock limit in minutes, 0 = none
    patience: int = 0  # validations (every valid_every steps) without improvement before stopping; 0 = never
    max_bad_steps: int = 5  # NaN/Inf losses in a row before aborting
    # validation, logging, checkpoints
    valid_every: int = 1000
    log_every: int = 50
    num_samples: int = 3  # sample translations logged at each validation
    best_metric: str = "bleu"  # bleu | chrf | loss
    # sacreBLEU tokenizer of BLEU (validation, nmt.translate --ref): auto = sacreBLEU's choice for
    # data.tgt_lang (13a; zh, ja-mecab, ko-mecab for Chinese, Japanese, Korean), or a name (intl, char, ...)
    bleu_tokenize: str = "auto"
    keep_last: int = 5  # numbered checkpoints kept besides latest/best
    # "" (or false/none/no/0) = fresh run; true (latest/yes/1) = latest checkpoint in run_dir; or a path
    resume: str = ""

    def __post_init__(self) -> None:
        _one_of("train.precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        _one_of("train.schedule", self.schedule, ("inverse_sqrt", "cosine"))
        _one_of("train.best_metric", self.best_metric, ("bleu", "chrf", "loss"))
        _check(
            self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device) is not None,
            f"train.device={self.device!r} is not valid; use auto, cpu, cuda or cuda:N.",
        )
        _check(0 <= self.seed < 2**32, f"train.seed={self.seed} must be in [0, 2**32).")
        _check(0 < self.lr < 1.0, f"train.lr={self.lr} must be in (0, 1).")
        _check(0 <= self.min_lr <= self.lr, f"train.min_lr={self.min_lr} must be in [0, train.lr={self.lr}].")
        _check(0 < self.adam_eps < 1.0, f"train.adam_eps={self.adam_eps} must be in (0, 1).")
        _check(0 <= self.weight_decay < 1.0, f"train.weight_decay={self.weight_decay} must be in [0, 1).")
        _check(
            len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"train.betas={list(self.betas)} must be two numbers in [0, 1).",
        )
        _check(self.warmup_steps >= 0, "train.warmup_steps must be >= 0.")
        _check(self.accum_steps >= 1, f"train.accum_steps={self.accum_steps} must be >= 1.")
        _check(self.clip_norm >= 0, "train.clip_norm must be >= 0 (0 disables clipping).")
        _check(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing must be in [0, 1).")
        _check(self.max_steps >= 1, f"train.max_steps={self.max_steps} must be >= 1.")
        _check(self.max_epochs >= 0 and self.max_time_min >= 0, "train.max_epochs/max_time_min must be >= 0.")
        _check(
            self.valid_every >= 1 and self.log_every >= 1,
            "train.valid_every and train.log_every must be >= 1.",
        )
        _check(self.keep_last >= 0 and self.patience >= 0, "train.keep_last and train.patience must be >= 0.")
        _check(self.max_bad_steps >= 1, "train.max_bad_steps must be >= 1.")
        _check(self.num_samples >= 0, f"train.num_samples={self.num_samples} must be >= 0.")

    @property
    def resume_requested(self) -> bool:
        return self.resume.lower() not in ("", "false", "none", "no", "0")

    @property
    def resume_latest(self) -> bool:
        """train.resume names the run's own latest checkpoint (true, latest), not a path."""
        return self.resume.lower() in ("true", "latest", "yes", "1")


@dataclass
class DecodeConfig:
    beam: int = 5  # 1 = greedy
    len_penalty: float = 1.0  # GNMT alpha: score / ((5 + len) / 6) ** alpha
    max_len_a: float = 1.2  # hypotheses end at max_len_a * src_len + max_len_b tokens
    max_len_b: int = 10
    min_len: int = 1
    batch_size: int = 64  # sentences per batch (cap)
    max_tokens: int = 4096  # padded source tokens per batch (cap): sentences x the longest
    # On CPU, batches decoded at the same time, each on its own thread with an equal share of torch's
    # threads. 0: one per torch thread, at most 8. Never more than the threads or the batches; 1 on GPUs.
    workers: int = 0

    def __post_init__(self) -> None:
        _check(1 <= self.beam <= 1000, f"decode.beam={self.beam} must be in [1, 1000].")
        _check(0 <= self.len_penalty <= 100, f"decode.len_penalty={self.len_penalty} must be in [0, 100].")
        # Outputs are capped by the model's positions anyway; past these bounds a + b overflows.
        _check(0 <= self.max_len_a <= 1000, f"decode.max_len_a={self.max_len_a} must be in [0, 1000].")
        _check(
            1 <= self.max_len_b <= 1_000_000, f"decode.max_len_b={self.max_len_b} must be in [1, 1000000]."
        )
        _check(0 <= self.min_len <= 1_000_000, f"decode.min_len={self.min_len} must be in [0, 1000000].")
        _check(
            self.batch_size >= 1 and self.max_tokens >= 1,
            "decode.batch_size and decode.max_tokens must be >= 1.",
        )
        _check(0 <= self.workers <= 1024, f"decode.workers={self.workers} must be in [0, 1024] (0 = auto).")


@dataclass
class Config:
    name: str = "default"
    # Everything a run writes goes here: checkpoints, TensorBoard events, tokenizer, resolved config.
    run_dir: str = "runs/${name}"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    def check_for_training(self) -> None:
        """Checks across sections that only training needs (a checkpoint that fails them still decodes)."""
        # Empty (an unset shell variable): the run would be written into the current folder or runs/.
        _check(bool(self.run_dir.strip()), "run_dir is empty; give the folder the run is written to.")
        _check(bool(self.name.strip()), "name is empty; give the run a name (its folder is runs/NAME).")
        _check(
            self.data.format == "hub" or bool(self.data.dir.strip()),
            "data.dir is empty; give the corpus folder.",
        )
        # Every micro-batch of a step is held at once: past this, memory runs out before the first update.
        # (Checked here, not in TrainConfig, so that a checkpoint trained with more still loads.)
        accum = self.train.accum_steps
        _check(accum <= 1024, f"train.accum_steps={accum} must be in [1, 1024].")
        _check(
            self.data.joint_vocab or not self.model.share_embeddings,
            "model.share_embeddings=true needs data.joint_vocab=true (one vocabulary for both languages); "
            "with separate vocabularies set model.share_embeddings=false.",
        )
        from nmt.evaluate import bleu_metric, bleu_options  # sacreBLEU: imported only when training

        try:  # validation would fail only once it is reached
            bleu_metric(**bleu_options(self))
        except ValueError as e:
            raise ConfigError(f"train.bleu_tokenize={self.train.bleu_tokenize!r}: {e}") from None
        # Training pairs have up to data.max_len pieces plus EOS (source) or BOS (target input).
        _check(
            self.model.max_positions >= self.data.max_len + 1,
            f"model.max_positions={self.model.max_positions} is too small for data.max_len={self.data.max_len} "
            f"(a training sentence takes up to {self.data.max_len + 1} positions); raise model.max_positions "
            "or lower data.max_len.",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (str/int/float/bool/list only): safe inside a weights_only checkpoint."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """Rebuild from :meth:`to_dict` output. Unknown keys are an error, missing keys take defaults."""

        def build(klass: type, values: dict[str, Any]) -> Any:
            names = {f.name for f in dataclasses.fields(klass)}
            unknown = set(values) - names
            if unknown:
                raise ConfigError(f"unknown {klass.__name__} keys: {', '.join(sorted(unknown))}")
            return klass(**values)

        d = dict(d)
        parts = {
            "data": build(DataConfig, d.pop("data", {})),
            "model": build(ModelConfig, d.pop("model", {})),
            "train": build(TrainConfig, d.pop("train", {})),
            "decode": build(DecodeConfig, d.pop("decode", {})),
        }
        return build(cls, {**d, **parts})


def register_schema() -> None:
    """Register :class:`Config` with Hydra's ConfigStore as ``base_config`` (see configs/config.yaml)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="base_config", node=Config)


def to_config(cfg: Any) -> Config:
    """Turn a composed Hydra/OmegaConf config into a plain :class:`Config` (runs all checks)."""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, Config):  # composed without the schema: validate by rebuilding
        return Config.from_dict(obj)
    # A key added with Hydra's "+key=value" is kept by the composed config but dropped by to_object.
    unknown = _unknown_keys(cfg, obj, "")
    if unknown:
        raise unknown_keys_error(unknown)
    return obj


def unknown_keys_error(keys: list[str]) -> ConfigError:
    """One sentence naming ``keys`` (dotted, e.g. ``train.max_step``) with the closest known ones."""
    import difflib

    known = [*_known_keys(Config, ""), *CONFIG_GROUPS]
    named = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        named.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return ConfigError(
        f"unknown config key(s): {', '.join(named)}. Check the spelling against configs/ "
        "(python -m nmt.train --cfg job prints every key)."
    )


CONFIG_GROUPS = ("data", "model", "train", "decode", "experiment")  # the folders of configs/
# Hydra's command-line flags that take a value (the next argument).
HYDRA_FLAGS_WITH_VALUE = {
    "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-c", "--cfg", "-p", "--package",
    "--experimental-rerun",
}  # fmt: skip


def check_override_keys(args: list[str]) -> None:
    """Refuse, in our words, ``key=value`` command-line overrides whose key the schema does not have.

    Hydra refuses them too, but with advice to add the key (``+key=value``) that only leads to the
    same refusal from :func:`to_config`. Config groups (``model=small``, ``+experiment=base``), Hydra's
    own keys and flags are left to Hydra.
    """
    if any(arg in ("-sc", "--shell-completion") or arg.startswith("--shell-completion=") for arg in args):
        return  # shell completion: its arguments are queries, not overrides
    unknown = []
    flag_value = False
    for arg in args:
        if flag_value or arg in HYDRA_FLAGS_WITH_VALUE:  # a flag's value may hold "=": a folder, a file
            flag_value = not flag_value
            continue
        key = arg.split("=", 1)[0].lstrip("+~")
        if arg.startswith("-") or "=" not in arg or "@" in key or key.startswith("hydra"):
            continue
        if not key:
            raise ConfigError(f"{arg!r} has no key before '='; write overrides as key=value, without spaces.")
        if key != key.strip():
            raise ConfigError(f"{arg!r}: write overrides as key=value, without spaces around the key.")
        if not _is_known_key(key):
            unknown.append(key)
    if unknown:
        raise unknown_keys_error(unknown)


def _is_known_key(key: str) -> bool:
    """A config group (``train=default``), a field of the schema (``train.lr``), or an index into one
    (``train.betas.0``)."""
    return key in CONFIG_GROUPS or any(key == f or key.startswith(f"{f}.") for f in _known_keys(Config, ""))


def _known_keys(klass: type, prefix: str) -> list[str]:
    keys = []
    for f in dataclasses.fields(klass):
        sub = f.default_factory if dataclasses.is_dataclass(f.default_factory) else None  # type: ignore[arg-type]
        keys += _known_keys(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"]
    return keys


def _unknown_keys(node: Any, obj: Any, prefix: str) -> list[str]:
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = []
    for key in node:
        if key not in names:
            unknown.append(f"{prefix}{key}")
        elif dataclasses.is_dataclass(getattr(obj, key)):
            unknown += _unknown_keys(node[key], getattr(obj, key), f"{prefix}{key}.")
    return unknown
