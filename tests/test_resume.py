"""nmt.resume: what a resumed run is told when its checkpoint differs from it."""

from __future__ import annotations

from nmt.config import Config, DataConfig, TrainConfig
from nmt.resume import changed_settings_warnings, data_change_warning, resume_refusal, world_size_warning


def config(accum_steps: int = 1, max_tokens: int = 4096) -> Config:
    return Config(data=DataConfig(max_tokens=max_tokens), train=TrainConfig(accum_steps=accum_steps))


def checkpoint(world_size: int, accum_steps: int = 1) -> dict:
    return {"world_size": world_size, "config": config(accum_steps).to_dict()}


def test_a_new_world_size_names_the_update_size_and_the_accum_steps_that_keep_it():
    assert world_size_warning(checkpoint(2), config(), 2, 10, 1, "c.pt") is None
    fewer = world_size_warning(checkpoint(2), config(), 1, 10, 1, "c.pt")
    assert "2 processes and this run has 1" in fewer and "now sees up to 4,096 tokens" in fewer
    assert "it was 8,192" in fewer and fewer.endswith("train.accum_steps=2 keeps the update size")
    kept = world_size_warning(checkpoint(2), config(accum_steps=2), 1, 10, 1, "c.pt")
    assert "still sees up to 8,192 tokens" in kept and "keeps the update size" not in kept
    more = world_size_warning(checkpoint(1), config(), 8, 10, 1, "c.pt")  # 8 does not divide 1
    assert "now sees up to 32,768 tokens" in more and "keeps the update size" not in more
    no_world_size = world_size_warning({"config": {}}, config(), 2, 0, 0, "old.pt")  # from before it was kept
    assert "run of 1 processes" in no_world_size
    assert "not yet trained on" in more
    reordered = world_size_warning(checkpoint(1), config(), 8, 10, 1, "c.pt", same_order=False)
    assert "not yet trained on" not in reordered and "32,768 tokens" in reordered


def test_changed_settings_are_named_and_max_steps_only_under_cosine():
    saved = TrainConfig().__dict__ | {"max_steps": 500}
    assert changed_settings_warnings(saved, TrainConfig(max_steps=900)) == []
    warnings = changed_settings_warnings(saved, TrainConfig(lr=2e-3, schedule="cosine", max_steps=900))
    assert [w.split(" changed")[0] for w in warnings] == ["train.lr", "train.schedule", "train.max_steps"]


def test_data_changes_are_told_only_when_keys_differ():
    now = {"train": "a", "valid": "b"}
    assert data_change_warning(None, now, "c.pt") is None  # from before the keys were kept
    assert data_change_warning(dict(now), now, "c.pt") is None
    train = data_change_warning({"train": "x", "valid": "b"}, now, "c.pt")
    assert "other training data" in train and "not comparable" not in train
    valid = data_change_warning({"train": "a", "valid": "x"}, now, "c.pt")
    assert "other validation data" in valid and "not comparable" in valid


def test_a_checkpoint_from_before_bleu_tokenize_resumes_as_13a():
    """Such a run scored validation BLEU with 13a whatever its language; a Chinese one continues only
    with train.bleu_tokenize=13a, so that its best score stays comparable."""
    cfg = Config(data=DataConfig(tgt_lang="zh"))
    saved = cfg.to_dict()
    del saved["train"]["bleu_tokenize"]
    refused = resume_refusal(cfg, saved, "old.pt")
    assert "train.bleu_tokenize='13a' and this run asks for train.bleu_tokenize='zh'" in refused
    assert (
        resume_refusal(
            Config(data=DataConfig(tgt_lang="zh"), train=TrainConfig(bleu_tokenize="13a")), saved, "old.pt"
        )
        is None
    )
    # BLEU is not compared when the best checkpoint is chosen by loss.
    assert (
        resume_refusal(
            Config(data=DataConfig(tgt_lang="zh"), train=TrainConfig(best_metric="loss")), saved, "old.pt"
        )
        is None
    )
    other_model = cfg.to_dict() | {"model": saved["model"] | {"d_model": 64}}
    assert resume_refusal(cfg, other_model, "old.pt") == (
        "old.pt was trained with model.d_model=64 and this run asks for model.d_model=256; resume with the "
        "run's own settings."
    )
