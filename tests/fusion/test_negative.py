"""Generation's guidance negative follows what stage 2 trained as a dropped text (the manifest's guidance_negative)."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from fusion.config import register_configs
from fusion.errors import CheckpointError, ConfigError
from fusion.generate import Chat, ForceTokens, GenerationSettings
from fusion.model import MANIFEST, FusedModel
from tests.conftest import REPO, compose_config


@pytest.fixture(scope="module")
def saved(tiny_dir, tmp_path_factory):
    """Untrained tiny fused models saved as if stage 2 had trained them with each text_dropout_form."""
    out = {}
    for form in ("null", "duogen"):
        cfg = compose_config([f"tiny_dir={tiny_dir}", "stage=align", "generator=tiny_wan", "connector=last_mlp",
                              f"stage.text_dropout_form='{form}'"])  # quoted: Hydra reads a bare null as None
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(form) / "model"
        FusedModel.build(cfg).save_pretrained(path)
        out[form] = path
    return out


def manifest(path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def rewrite_manifest(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    mf = manifest(dst)
    edit(mf)
    (dst / MANIFEST).write_text(json.dumps(mf))


def draw_after_image(path, images, **settings):
    """One turn with a user image and one forced <|bov|>; returns the chat and the `negative` the DiT got."""
    chat = Chat.load(path, settings=GenerationSettings(steps=2, guidance=2.0, max_new_tokens=8, **settings))
    seen = []
    real = chat.model.generator.sample

    def spy(states, mask, cond, **kw):
        seen.append(kw["negative"])
        return real(states, mask, cond, **kw)

    chat.model.generator.sample = spy
    chat.logits_processor = ForceTokens({1: chat.mllm.bov_token_id, 3: chat.mllm.end_of_turn_id})
    chat.send("Move it left.", images=[str(images["square"])])
    assert len(seen) == 1 and len(chat.draws) == 1
    return chat, seen[0]


def ours(caplog) -> list[logging.LogRecord]:
    """Warnings of the generation loop (transformers logs its own deprecations)."""
    return [r for r in caplog.records if r.name == "fusion.generate" and r.levelno >= logging.WARNING]


def test_manifest_records_the_trained_negative(saved, tmp_path):
    for form, path in saved.items():
        assert manifest(path)["guidance_negative"] == form
        assert manifest(path)["settings"]["text_dropout_form"] == form
        model = FusedModel.from_pretrained(path)
        assert model.trained_negative == form
    # never trained by stage 2 (settings of stage sft, or none): no trained negative
    for settings in ({"name": "sft", "text_dropout_form": "null"}, None):
        FusedModel(model.mllm, settings=settings).save_pretrained(tmp_path / "sft")
        assert manifest(tmp_path / "sft")["guidance_negative"] is None
        assert FusedModel.from_pretrained(tmp_path / "sft").trained_negative is None


def test_older_manifest_falls_back_to_settings_and_the_field_wins(saved, tmp_path):
    rewrite_manifest(saved["duogen"], tmp_path / "old", lambda mf: mf.pop("guidance_negative"))
    assert FusedModel.from_pretrained(tmp_path / "old").trained_negative == "duogen"
    rewrite_manifest(saved["duogen"], tmp_path / "field", lambda mf: mf.update(guidance_negative="null"))
    assert FusedModel.from_pretrained(tmp_path / "field").trained_negative == "null"
    rewrite_manifest(saved["duogen"], tmp_path / "bad", lambda mf: mf.update(guidance_negative="zeros"))
    with pytest.raises(CheckpointError, match="guidance_negative"):
        FusedModel.from_pretrained(tmp_path / "bad")


def test_auto_uses_zeros_for_a_null_trained_model(saved, images, caplog):
    assert GenerationSettings().negative == "auto"
    with caplog.at_level(logging.WARNING, logger="fusion.generate"):
        chat, (neg, neg_mask) = draw_after_image(saved["null"], images)
    assert chat.negative == "null" and not ours(caplog)
    assert chat.draws[0].negative_tokens == 0
    assert neg.abs().sum() == 0 and neg_mask.sum() > 0


def test_auto_uses_the_duogen_prefix_for_a_duogen_trained_model(saved, images, caplog):
    with caplog.at_level(logging.WARNING, logger="fusion.generate"):
        chat, (neg, neg_mask) = draw_after_image(saved["duogen"], images)
    assert chat.negative == "duogen" and not ours(caplog)
    n = chat.draws[0].negative_tokens
    assert 0 < n < chat.draws[0].context_tokens
    assert chat.state.ids[n - 1] == chat.mllm.token_id("<|vision_end|>")  # the prefix up to the last image
    want, want_mask = chat._connector_states(n)
    torch.testing.assert_close(neg, want.to(neg.dtype))
    torch.testing.assert_close(neg_mask, want_mask)
    assert neg.abs().sum() > 0


def test_unknown_training_resolves_auto_to_null(saved, tmp_path, images):
    def edit(mf):
        mf.pop("guidance_negative")
        mf["settings"] = {}

    rewrite_manifest(saved["duogen"], tmp_path / "unknown", edit)
    chat, (neg, _) = draw_after_image(tmp_path / "unknown", images)
    assert chat.negative == "null" and chat.draws[0].negative_tokens == 0 and neg.abs().sum() == 0


@pytest.mark.parametrize("trained, asked", [("null", "duogen"), ("duogen", "null")])
def test_explicit_mismatch_still_works_but_warns(saved, images, caplog, trained, asked):
    with caplog.at_level(logging.WARNING, logger="fusion.generate"):
        chat, (neg, _) = draw_after_image(saved[trained], images, negative=asked)
    assert chat.negative == asked
    assert (chat.draws[0].negative_tokens > 0) == (asked == "duogen")
    warnings = ours(caplog)
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert f"negative={asked}" in msg and f"text_dropout_form={trained}" in msg


def test_explicit_match_does_not_warn(saved, caplog):
    with caplog.at_level(logging.WARNING, logger="fusion.generate"):
        chat = Chat.load(saved["duogen"], settings=GenerationSettings(negative="duogen"))
    assert chat.negative == "duogen" and not ours(caplog)


def test_bogus_negative_fails_naming_the_key(saved):
    with pytest.raises(ConfigError, match="negative"):
        Chat(FusedModel.from_pretrained(saved["null"]), GenerationSettings(negative="bogus"))
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="generate", overrides=["model=x", "output_dir=o", "negative=bogus"])
        assert compose(config_name="generate", overrides=["model=x", "output_dir=o"]).negative == "auto"
    with pytest.raises(ConfigError, match=r"negative must be auto, duogen or null, got 'bogus'"):
        OmegaConf.to_object(cfg)
