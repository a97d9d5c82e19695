"""Config composition: experiments compose, overrides apply, typos and absurd values fail clearly."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from nmt.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    check_override_keys,
    register_schema,
    to_config,
)
from tests.conftest import REPO, tiny_config

register_schema()


def composed(*overrides: str) -> Config:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return to_config(compose("config", overrides=list(overrides)))


@pytest.mark.parametrize(
    "experiment", sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))
)
def test_every_experiment_composes(experiment):
    cfg = composed(f"+experiment={experiment}")
    assert cfg.name and cfg.run_dir == f"runs/{cfg.name}"


def test_the_config_groups_restate_the_dataclass_defaults():
    """configs/ shows the options with their defaults; nmt/config.py holds them. They must not drift
    apart: the command line without overrides trains Config()'s run, but for the dropouts of the
    default model group, model/small.yaml, which are higher for Multi30k."""
    cfg = composed()
    assert dataclasses.replace(cfg, run_dir="runs/${name}") == Config(
        model=ModelConfig(dropout=0.3, attn_dropout=0.1, act_dropout=0.1)
    )


def test_command_line_overrides_reach_the_dataclasses():
    cfg = composed("+experiment=smoke", "train.max_steps=7", "model.d_model=48", "model.n_heads=6")
    assert (cfg.train.max_steps, cfg.model.d_model, cfg.model.n_heads) == (7, 48, 6)
    assert isinstance(cfg.model, ModelConfig)


def test_misspelled_key_is_an_error():
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        composed("+experiment=smoke", "train.max_stepz=3")


@pytest.mark.parametrize(
    "override, key",
    [("+train.max_step=5", "train.max_step"), ("+foo=1", "foo"), ("+model.extra.depth=2", "model.extra")],
)
def test_a_key_forced_in_with_plus_is_still_checked(override, key):
    """Hydra suggests "+key=value" for a key it does not know; the dataclasses would drop it silently."""
    with pytest.raises(
        ConfigError, match=rf"unknown config key\(s\): {re.escape(key)}( \(did you mean .*\?\))?\."
    ):
        composed("+experiment=smoke", override)


@pytest.mark.parametrize(
    "args",
    [
        ["train.betas.0=0.8", "--cfg", "job"],  # an index into a list value
        ["model=small", "train=default", "+experiment=base", "name=x", "run_dir=y"],  # groups, top-level keys
        [
            "~train.lr",
            "++train.lr=1",
            "train.lr=a=b",
            "hydra.run.dir=x",
            "hydra/launcher=basic",
            "data@foo=x",
        ],
        ["-sc", "install=bash"],  # shell completion
        ["--shell-completion", "query=train.max"],
        ["-cd", "/tmp/a=b", "train.lr=1e-3"],  # a flag's value with "="
    ],
)
def test_override_keys_hydra_accepts_pass_the_early_check(args):
    check_override_keys(args)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.max_step=3"], "unknown config key(s): train.max_step (did you mean train.max_steps?)."),
        (["max_steps=3"], "unknown config key(s): max_steps (did you mean train.max_steps?)."),
        (
            ["experiment.x=1", "data.dirr=x"],
            "experiment.x (did you mean experiment?), data.dirr (did you mean",
        ),
        (["train.lr", "=1"], "'=1' has no key before '='; write overrides as key=value, without spaces."),
        (["train.lr =1"], "'train.lr =1': write overrides as key=value, without spaces around the key."),
    ],
)
def test_override_keys_the_schema_lacks_are_refused_early(args, message):
    with pytest.raises(ConfigError) as refused:
        check_override_keys(args)
    assert message in str(refused.value)


def test_a_failing_sweep_job_is_named(tmp_path):
    proc = run_train("-m", "+experiment=smoke", f"run_dir={tmp_path / 'sweep'}", "train.lr=-1,1e-3")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith(
        "error: job 0 of the sweep: train.lr=-1.0 must be in (0, 1). (the sweep stops"
    )
    assert not (tmp_path / "sweep" / "1").exists()


def test_a_misspelled_key_on_the_command_line_is_refused_in_our_words_with_a_suggestion(tmp_path):
    """Not Hydra's refusal, whose advice (+key=value) only leads to the same refusal; nothing is written."""
    proc = run_train("+experiment=smoke", f"run_dir={tmp_path / 'run'}", "train.max_stepz=3", "modle=small")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr == (
        "error: unknown config key(s): train.max_stepz (did you mean train.max_steps?), modle (did you mean "
        "model?). Check the spelling against configs/ (python -m nmt.train --cfg job prints every key).\n"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_heads=5", "divisible"),
        ("model.enc_layers=1000000", r"model.enc_layers=1000000 must be in \[1, 1000\]\."),
        ("model.dec_layers=2000000", r"model.dec_layers=2000000 must be in \[1, 1000\]\."),
        ("model.dec_layers=0", r"model.dec_layers=0 must be in \[1, 1000\]\."),
        ("data.max_tokens=10", "data.max_tokens=10"),
        ("train.lr=5", "train.lr=5"),
        ("decode.beam=0", "decode.beam"),
        ("train.precision=fp8", "train.precision"),
        ("data.src_lang=de", "must differ"),
        ("train.min_lr=-0.01", r"train.min_lr=-0.01 must be in \[0, train.lr"),
        ("train.weight_decay=-1", "train.weight_decay=-1"),
        ("train.adam_eps=-1", "train.adam_eps=-1"),
        ("train.seed=-1", r"train.seed=-1 must be in \[0, 2\*\*32\)"),
        ("train.seed=5000000000", "train.seed=5000000000"),
        ("train.num_samples=-1", "train.num_samples=-1"),
        ("train.device=cuda:x", "train.device='cuda:x' is not valid"),
        ("decode.max_len_a=1e30", "decode.max_len_a=1e\\+30 must be in"),
        ("data.download=none", r"data.download='none' is not valid; choose one of '' \(off\), 'multi30k'\."),
        ("train.schedule=linear", r"choose one of 'inverse_sqrt', 'cosine'\.$"),
    ],
)
def test_absurd_values_fail_with_a_sentence_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        composed("+experiment=smoke", override)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.joint_vocab=false", "model.share_embeddings=true needs data.joint_vocab=true"),
        ("run_dir=", "run_dir is empty"),  # an unset shell variable: the run would land in the current folder
        ("name=", "name is empty"),  # runs/ itself, among the other runs
        ("data.dir=", "data.dir is empty"),
        ("train.accum_steps=1000000", r"train.accum_steps=1000000 must be in \[1, 1024\]\."),
        ("train.bleu_tokenize=moses", r"train.bleu_tokenize='moses': BLEU has no tokenizer 'moses'"),
    ],
)
def test_settings_training_refuses(override, message):
    cfg = composed("+experiment=smoke", override)
    with pytest.raises(ConfigError, match=message):
        cfg.check_for_training()
    assert Config.from_dict(cfg.to_dict()) == cfg, "as a checkpoint's config it still loads"
    # The remedy each message names is accepted. (Checked for training only: a checkpoint saved with
    # such settings still loads and decodes.)
    fixes = ["model.share_embeddings=false", "run_dir=r", "name=n", "data.dir=d", "train.accum_steps=4"]
    fixes.append("train.bleu_tokenize=intl")
    composed("+experiment=smoke", override, *fixes).check_for_training()


def test_download_can_be_turned_off_from_the_command_line():
    assert composed("+experiment=smoke", "data.download=").data.download == ""


def test_config_round_trips_through_a_plain_dict():
    cfg = composed("+experiment=base")
    assert Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown DataConfig keys: bogus"):
        Config.from_dict({"data": {**DataConfig().__dict__, "bogus": 1}})
    # Checkpoints written while decode.nbest was a key (it set nothing) still load.
    from nmt.checkpoint import config_from_checkpoint

    old = cfg.to_dict()
    old["decode"]["nbest"] = 1
    assert config_from_checkpoint({"config": old}) == cfg
    with pytest.raises(ConfigError, match="unknown DecodeConfig keys: nbest"):
        Config.from_dict(old)  # elsewhere it is a key like any other that does not exist


def test_resume_flag_spellings():
    assert composed("+experiment=smoke", "train.resume=true").train.resume_requested
    assert not composed("+experiment=smoke").train.resume_requested


# --- the command line: `python -m nmt.train` ------------------------------------------------------


def cli_overrides(cfg: Config) -> list[str]:
    """``key=value`` arguments that make ``python -m nmt.train`` compose exactly ``cfg``."""

    def value(v) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, list):
            return "[" + ",".join(value(x) for x in v) + "]"
        if isinstance(v, str):  # quoted, so that e.g. resume "true" stays a string, not a bool
            return f"'{v}'"
        return str(v)

    args = [f"name={cfg.name}", f"run_dir={cfg.run_dir}"]
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            args += [f"{section}.{key}={value(v)}" for key, v in values.items()]
    return args


def run_train(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m nmt.train ARGS`` in a subprocess; stdout and stderr kept apart, as text."""
    return subprocess.run(
        [sys.executable, "-m", "nmt.train", *args],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def child_env() -> dict[str, str]:
    # One thread per process: the tests may run beside other work on a 2-core machine.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_cli_overrides_compose_the_tiny_config(toy_dir, tmp_path):
    cfg = tiny_config(toy_dir, tmp_path / "run", betas=[0.9, 0.99], resume="true")
    assert composed(*cli_overrides(cfg)) == cfg


def test_cli_startup_reports_the_run_directory_and_parameter_count_and_guards_its_config(toy_dir, tmp_path):
    from nmt.checkpoint import config_from_checkpoint, load_checkpoint
    from nmt.data.tokenizer import Tokenizer
    from nmt.model import Transformer

    cfg = tiny_config(toy_dir, tmp_path / "run", max_steps=2)
    proc = run_train(*cli_overrides(cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run directory: {(tmp_path / 'run').resolve()}" in proc.stdout
    # Rebuild the model the run trained, from its checkpoint, and count its parameters here.
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    tok = Tokenizer.from_state(state["tokenizer"])
    model = Transformer(config_from_checkpoint(state).model, tok.src_vocab_size, tok.tgt_vocab_size)
    model.load_state_dict(state["model"])
    assert f"model: {model.num_parameters():,} parameters" in proc.stdout
    assert "done: reached train.max_steps=2 | step 2" in proc.stdout

    # Resuming into another model is refused in one line; the run's config.yaml and TensorBoard log
    # are left as they were.
    config_yaml = (tmp_path / "run" / "config.yaml").read_text()
    event_files = sorted((tmp_path / "run" / "tb").iterdir())
    proc = run_train(*cli_overrides(cfg), "train.resume='true'", "model.d_model=64")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "model.d_model=32" in errors[0] and "model.d_model=64" in errors[0]
    assert (tmp_path / "run" / "config.yaml").read_text() == config_yaml
    assert sorted((tmp_path / "run" / "tb").iterdir()) == event_files


def test_a_run_directory_that_cannot_be_made_is_one_error_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    run_dir = tmp_path / "a-file" / "run"  # under a file: no folder can be made there (even as root)
    for flags, steps in (([], "1"), (["-m"], "1,2")):  # a run, a sweep
        proc = run_train(*flags, "+experiment=smoke", f"run_dir={run_dir}", f"train.max_steps={steps}")
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert f"error: run_dir={run_dir} cannot be written (Not a directory)" in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout


def test_a_sweep_trains_each_job_in_its_own_run_directory_and_resumes_each(toy_dir, tmp_path):
    """``python -m nmt.train -m key=a,b``: job N trains in run_dir/N, with its own log; the sweep goes
    on after a job ends, and the same sweep with train.resume=true continues each job where it was."""
    from nmt.checkpoint import load_checkpoint

    cfg = tiny_config(toy_dir, tmp_path / "sweep", max_steps=2)

    def sweep(max_steps: str, *extra: str) -> subprocess.CompletedProcess:
        args = [a for a in cli_overrides(cfg) if not a.startswith(("train.max_steps=", "train.resume="))]
        return run_train("-m", *args, f"train.max_steps={max_steps}", *extra, timeout=240)

    proc = sweep("2,3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, steps in ((0, 2), (1, 3)):
        run_dir = tmp_path / "sweep" / str(job)
        assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["train_state"]["step"] == steps
        assert f"run directory: {run_dir.resolve()}" in (run_dir / "train.log").read_text()
    assert proc.stdout.count("done: reached train.max_steps") == 2

    # Resumed, with a third job that never ran (as after a sweep stopped early): it starts.
    proc = sweep("4,5,6", "train.resume='true'")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, (start, steps) in enumerate(((2, 4), (3, 5), (0, 6))):
        run_dir = tmp_path / "sweep" / str(job)
        assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["train_state"]["step"] == steps
        resumed = f"resumed from {run_dir / 'checkpoints' / 'latest.pt'} at step {start} "
        assert (resumed in (run_dir / "train.log").read_text()) == (start > 0)
    assert "job 2 of the sweep has no checkpoint yet: it starts now" in proc.stdout

    # A single run into the sweep's folder, or a sweep into a single run's folder, would nest one in
    # the other: refused before anything is written.
    args = [a for a in cli_overrides(cfg) if not a.startswith("run_dir=")]
    single = run_train(*args, f"run_dir={tmp_path / 'sweep'}")
    assert single.returncode == 2 and f"run_dir={tmp_path / 'sweep'} holds a sweep" in single.stderr
    args = [a for a in args if not a.startswith("train.max_steps=")]
    nested = run_train("-m", *args, f"run_dir={tmp_path / 'sweep' / '0'}", "train.max_steps=7,8")
    assert nested.returncode == 2 and "holds a single run (checkpoints/latest.pt)" in nested.stderr
    assert not (tmp_path / "sweep" / "0" / "0").exists()

    # Under torchrun every job would set up the process group again in the same process: refused.
    env = {**child_env(), "WORLD_SIZE": "2", "RANK": "0"}
    args = [a for a in cli_overrides(cfg) if not a.startswith("train.max_steps=")]
    refused = subprocess.run(
        [sys.executable, "-m", "nmt.train", "-m", *args, "train.max_steps=7,8"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2 and "start one torchrun per setting instead" in refused.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=5", "train.lr=5.0 must be in (0, 1)."),
        ("data.dir=/nonexistent/corpus", "/nonexistent/corpus"),
        ("model.max_positions=16", "model.max_positions=16 is too small for data.max_len=64"),
        ("data.joint_vocab=false", "model.share_embeddings=true needs data.joint_vocab=true"),
    ],
)
def test_cli_bad_input_exits_2_with_one_sentence_and_no_traceback(tmp_path, override, message):
    run_dir = tmp_path / "run"
    proc = run_train("+experiment=smoke", "data.download=''", f"run_dir={run_dir}", override, timeout=60)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    sentence = errors[0].removeprefix("error: ")
    assert sentence.endswith(".") and sentence.count(". ") == 0, f"not one sentence: {sentence!r}"
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (run_dir / "checkpoints").exists(), "nothing is trained or saved"
    assert sentence not in proc.stdout  # once on the terminal, not also as a log line
    assert f"[ERROR] - {sentence}" in (run_dir / "train.log").read_text()  # but in the run's log
