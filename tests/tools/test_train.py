"""tools/train.py as a user runs it: both stages, ZeRO-2 and ZeRO-3, resume after SIGKILL, bad data, init_from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def cmd(*overrides):
    return [sys.executable, str(REPO / "tools" / "train.py"), *overrides]


def env():
    e = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def train(*overrides, check=True):
    p = subprocess.run(cmd(*overrides), cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    if check:
        assert p.returncode == 0, p.stderr[-4000:]
    return p


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # gain rows (gain/...) carry no loss


def stop_then_resume(common: list[str], run: Path, step: int) -> Path:
    """Run ``common`` into ``run``, stopped by SIGTERM after ``step`` (fusion/faults.py), then resume it to the end."""
    p = subprocess.run(cmd(*common, f"hydra.run.dir={run}"), cwd=REPO, env={**env(), "UNIFUSE_FAULT": f"term_after_step@{step}"},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 143, p.stderr[-2000:]
    train(*common, f"hydra.run.dir={run}")
    assert "resumed from" in (run / "train.log").read_text()
    return run


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return f"tiny_dir={tiny_dir}"


@pytest.fixture(scope="module")
def sft_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    train(tiny, "stage=sft", "stage.max_steps=12", "stage.lr=1e-3", "stage.warmup_steps=0", f"hydra.run.dir={out}")
    return out


def test_stage1_sft_zero2_runs_lowers_loss_and_exports(sft_run):
    ls = losses(sft_run)
    assert sorted(ls) == list(range(1, 13))
    assert sum(ls[s] for s in (10, 11, 12)) < sum(ls[s] for s in (1, 2, 3))
    summary = json.loads((sft_run / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["skipped"] == {}
    from fusion.model import FusedModel

    m = FusedModel.from_pretrained(sft_run / "final")
    assert m.generator is None and m.mllm.bov_token_id > 0
    assert (sft_run / "train.log").is_file()


def test_guarded_adamw_clips_like_torch_and_skips_nonfinite_steps():
    """The single-rank path clips inside the guarded step (with the norm its NaN/Inf check computes): the same update as
    torch's clip_grad_norm_ then AdamW; a NaN gradient or loss leaves weights and moments untouched."""
    from fusion.train import GuardedAdamW

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(20, 10)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    grads = [torch.randn(20, 10) * 5 for _ in a]
    guarded, plain = GuardedAdamW(a, lr=0.1, fused=True), torch.optim.AdamW(b, lr=0.1)  # fused, as the trainer builds it
    guarded.clip_norm = 1.0
    for p, q, g in zip(a, b, grads):
        p.grad, q.grad = g.clone(), g.clone()
    norm = torch.nn.utils.clip_grad_norm_(b, 1.0)
    assert norm > 10  # clipping is active
    guarded.step()
    plain.step()
    assert not guarded.last_step_nonfinite
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q)
    before = [p.detach().clone() for p in a]
    moments = [guarded.state[p]["exp_avg"].clone() for p in a]
    a[1].grad = torch.full_like(a[1], float("nan"))
    guarded.step()
    assert guarded.last_step_nonfinite
    assert all(torch.equal(p, x) for p, x in zip(a, before))
    assert all(torch.equal(guarded.state[p]["exp_avg"], m) for p, m in zip(a, moments))
    for p in a:
        p.grad = torch.ones_like(p)
    guarded.nonfinite_loss = True  # a NaN loss with finite gradients is skipped too
    guarded.step()
    assert guarded.last_step_nonfinite and all(torch.equal(p, x) for p, x in zip(a, before))


@pytest.mark.slow  # the fast tier checks the guarded step's clipping against torch (above) and the ZeRO-0 log line
def test_single_rank_zero0_trains_exactly_as_zero2(tiny, sft_run, tmp_path):
    """One rank runs ZeRO-2 as ZeRO-0 (clipping in the guarded step, no gradient all-reduce); keeping ZeRO-2 gives the same losses."""
    assert "one rank: ZeRO-2 runs as ZeRO-0" in (sft_run / "train.log").read_text()
    train(tiny, "stage=sft", "stage.max_steps=12", "stage.lr=1e-3", "stage.warmup_steps=0", "deepspeed.single_rank_zero0=false",
          f"hydra.run.dir={tmp_path}")
    zero2, zero0 = losses(tmp_path), losses(sft_run)
    assert "runs as ZeRO-0" not in (tmp_path / "train.log").read_text()
    for step, loss in zero2.items():
        assert abs(zero0[step] - loss) < 1e-4 * max(1.0, abs(loss)), (step, zero0[step], loss)


def test_stage2_align_zero3_from_stage1_lowers_loss_and_reloads(tiny, sft_run, tmp_path):
    train(tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp", f"init_from={sft_run}", "deepspeed=zero3",
          "stage.max_steps=16", "stage.lr=2e-3", "stage.warmup_steps=0", "stage.sample_every=8", "stage.frame_select=learned",
          f"hydra.run.dir={tmp_path}")
    ls = losses(tmp_path)
    first, last = [ls[s] for s in range(1, 5)], [ls[s] for s in range(13, 17)]
    assert sum(last) < sum(first), ls
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-0000008.png", "step-0000016.png"]
    from fusion.model import FusedModel

    m = FusedModel.from_pretrained(tmp_path / "final")
    assert type(m.connector).__name__ == "LastMLP" and m.generator is not None
    for p in [*m.generator.transformer.parameters(), *m.frame_selector.parameters()]:  # ZeRO-3 shards were gathered for the export
        assert p.numel() > 0
    assert any(float(p.detach().abs().sum()) > 0 for p in m.frame_selector.query.parameters())


def test_stage2_learned_frame_head_trains_under_deepspeed_and_resumes_exactly(tiny, sft_run, tmp_path):
    """stage.frame_select=learned through the trainer: the head is part of what DeepSpeed wraps, so its gradients are
    cleared every step and its weights are in the checkpoint. A run stopped by SIGTERM after step 2 and resumed gives the
    uninterrupted run's per-step losses (the head's cross-entropy among them) and the same exported head. (Unregistered,
    its gradients were summed over every step and a resumed run restarted it from scratch.)"""
    from safetensors.torch import load_file

    common = [tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp", f"init_from={sft_run}", "stage.frame_select=learned",
              "stage.max_steps=4", "stage.save_every=2", "stage.lr=1e-3", "stage.warmup_steps=0", "stage.gain_every=0", "data.seed=2"]
    train(*common, f"hydra.run.dir={tmp_path / 'full'}")
    run = stop_then_resume(common, tmp_path / "stopped", step=2)

    def head_losses(d):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: (r["loss"], r["frame_select"]) for r in rows if "frame_select" in r}

    full, resumed = head_losses(tmp_path / "full"), head_losses(run)
    assert sorted(full) == sorted(resumed) == [1, 2, 3, 4]
    assert any(v[1] > 0 for v in full.values())  # samples with earlier images: the head learned
    for step in full:
        assert all(abs(a - b) < 1e-5 for a, b in zip(full[step], resumed[step])), (step, full[step], resumed[step])
    a = load_file(str(tmp_path / "full" / "final" / "frame_selector" / "model.safetensors"))
    b = load_file(str(run / "final" / "frame_selector" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_a_part_outside_what_deepspeed_wraps_is_refused(tiny, sft_run, tmp_path):
    """Stage 2 wraps the connector, the DiT and the frame head; a vision tower set to train there would get gradients that
    DeepSpeed never clears, reduces or checkpoints (they would sum over every step): refused by name, nothing written."""
    p = train(tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp", f"init_from={sft_run}", "stage.trainable.vision_tower=true",
              "stage.max_steps=2", f"hydra.run.dir={tmp_path}", check=False)
    assert p.returncode != 0 and "vision_tower would train outside the module DeepSpeed wraps" in p.stderr + p.stdout
    assert "Traceback" not in p.stderr and not (tmp_path / "final").exists()


def test_a_checkpoint_without_the_frame_head_is_refused_by_name(tiny, sft_run, tmp_path):
    """Checkpoints written before the learned frame head was part of the model DeepSpeed saves hold no head weights:
    resuming one says so (not DeepSpeed's missing-key traceback) and writes nothing."""
    from fusion.train import write_file_list

    common = [tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp", f"init_from={sft_run}", "stage.frame_select=learned",
              "stage.save_every=2", "stage.gain_every=0", f"hydra.run.dir={tmp_path}"]
    train(*common, "stage.max_steps=3")  # a checkpoint at step 2, the export at 3
    ckpt = tmp_path / "checkpoints" / "step-0000002"
    states = next(ckpt.rglob("mp_rank_00_model_states.pt"))
    saved = torch.load(states, weights_only=False)
    saved["module"] = {k: v for k, v in saved["module"].items() if not k.startswith("frame_selector.")}  # as written before
    torch.save(saved, states)
    write_file_list(ckpt)
    p = train(*common, "stage.max_steps=4", check=False)
    assert p.returncode != 0 and "holds no weights of the learned frame head" in p.stderr + p.stdout
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "checkpoints" / "step-0000004").exists()


def test_stage2_distillation_warm_up_with_a_frozen_dit_and_the_gain_instrument(tiny, tiny_dir, sft_run, tmp_path):
    """distill_steps + generator_frozen_steps: the DiT does not move while the connector learns; the conditioning
    gain is measured at step 0, every gain_every steps and at the end, into metrics.jsonl, train.log and summary.json."""
    from safetensors.torch import load_file

    train(tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp", f"init_from={sft_run}", "stage.max_steps=3",
          "stage.distill_steps=3", "stage.generator_frozen_steps=3", "stage.gain_every=2", "stage.warmup_steps=0",
          "stage.save_every=0", f"hydra.run.dir={tmp_path}")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    gains = {r["step"]: r for r in rows if "gain/gain@0.7" in r}
    assert sorted(gains) == [0, 2, 3]
    assert all("gain/reference_gain@0.7" in r for r in gains.values())  # the DiT's own encoder: the reference
    steps = [r for r in rows if "loss" in r]
    assert all(abs(r["loss"] - r["distill"]) < 1e-6 for r in steps)  # warm-up: the distillation alone
    log_text = (tmp_path / "train.log").read_text()
    assert "distillation teacher: UMT5EncoderModel" in log_text and "conditioning gain at t=0.3/0.5/0.7/0.9" in log_text
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [h["step"] for h in summary["conditioning_gain_history"]] == [0, 2, 3]
    assert all("reference_gain@0.7" in h for h in summary["conditioning_gain_history"])  # the own gain over time (erosion)
    assert "own-encoder gain" not in log_text  # a frozen DiT's own gain cannot erode: no stage.erosion_warn warning
    assert summary["gain_batch"] == {"conversations": 4, "held_out": False}
    before = load_file(str(tiny_dir / "wan" / "transformer" / "diffusion_pytorch_model.safetensors"))
    after = load_file(str(tmp_path / "final" / "generator" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen for the first 3 steps
    from fusion.model import FusedModel

    m = FusedModel.from_pretrained(tmp_path / "final")
    assert m.teacher is None  # the teacher is never part of the export


def _other_copy(tiny_dir: Path, where: Path, encoder_seed: int | None = None) -> Path:
    """The tiny Wan folder with its DiT's weights moved (an early snapshot of the same pretraining); ``encoder_seed``: also
    another text encoder (another teacher)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_dir / "wan", where)
    weights = where / "transformer" / "diffusion_pytorch_model.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in load_file(str(weights)).items()},
              str(weights))
    if encoder_seed is not None:
        enc = where / "text_encoder" / "model.safetensors"
        save_file({k: v * 1.5 for k, v in load_file(str(enc)).items()}, str(enc))
    return where


@pytest.mark.parametrize("zero", ["zero0", "zero2", "zero0_ema"])
def test_stage2_warm_up_on_another_copy_of_the_dit_then_the_rest_on_the_finished_one(tiny, tiny_dir, sft_run, tmp_path, zero):
    """make demo's split stage 2: the distillation warm-up (connector only) with stage.stop_before_generator on an early
    copy of the DiT stops, with a checkpoint and no export, before the first step that runs the DiT; the same command with
    resume_generator=folder on the finished DiT goes on from there and gives the per-step losses and the export of one run
    on the finished DiT throughout. Resumed with the checkpoint's DiT instead, the first joint step differs. With ZeRO-2 on
    one rank (deepspeed.single_rank_zero0=false) the optimizer's flat fp32 copy of the weights is read again too; with
    stage.ema_decay the export (the average) holds the finished DiT's average, not the early copy's."""
    from safetensors.torch import load_file

    early = _other_copy(tiny_dir, tmp_path / "wan_early")
    common = [tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp", f"init_from={sft_run}", "stage.max_steps=4",
              "stage.distill_steps=2", "stage.generator_frozen_steps=2", "stage.distill_target=set", "stage.distill_weight=1.0",
              "stage.warmup_steps=0", "stage.lr=1e-3", "stage.save_every=0", "stage.gain_every=0", "data.seed=2",
              *(["deepspeed.single_rank_zero0=false"] if zero == "zero2" else []), *(["stage.ema_decay=0.5"] if zero == "zero0_ema" else [])]
    train(*common, f"hydra.run.dir={tmp_path / 'one'}")
    split = tmp_path / "split"
    train(*common, "stage.stop_before_generator=true", f"generator.path={early}", f"hydra.run.dir={split}")
    summary = json.loads((split / "summary.json").read_text())
    assert summary["interrupted"]["reason"] == "stage.stop_before_generator" and summary["steps"] == 2
    assert not (split / "final").exists() and (split / "checkpoints" / "step-0000002").is_dir()
    assert "step 3 is the first to run the generator" in (split / "train.log").read_text()
    import shutil

    shutil.copytree(split, tmp_path / "stale")  # the same checkpoint, resumed with its own (early) DiT below
    train(*common, "resume_generator=folder", f"hydra.run.dir={split}")
    assert "resume_generator=folder: the generator's weights from" in (split / "train.log").read_text()
    one, two = losses(tmp_path / "one"), losses(split)
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    assert all(abs(one[k] - two[k]) < 1e-5 for k in one), (one, two)
    for part in ("generator/transformer/diffusion_pytorch_model.safetensors", "connector/model.safetensors"):
        a, b = load_file(str(tmp_path / "one" / "final" / part)), load_file(str(split / "final" / part))
        assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), part
    train(*common, f"hydra.run.dir={tmp_path / 'stale'}")  # resume_generator=checkpoint: the early DiT's weights
    assert abs(losses(tmp_path / "stale")[3] - one[3]) > 1e-4


def test_stage2_split_with_the_dit_frozen_throughout_reads_the_folders_dit_at_every_resume(tiny, tiny_dir, sft_run, tmp_path):
    """The toy recipe's stage 2 (stage.trainable.generator=frozen, no stage.generator_frozen_steps): the warm-up on an early
    copy of the DiT, then resume_generator=folder on the finished one; stopped after a step that ran the DiT and resumed
    with the same command, it goes on (the checkpoint's DiT is the folder's already). Per-step losses and the export equal
    one run's on the finished DiT throughout, and the exported DiT is the folder's, bit for bit."""
    from safetensors.torch import load_file

    early = _other_copy(tiny_dir, tmp_path / "wan_early")
    common = [tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp", f"init_from={sft_run}", "stage.max_steps=4",
              "stage.distill_steps=2", "stage.trainable.generator=frozen", "stage.distill_target=set", "stage.distill_weight=1.0",
              "stage.warmup_steps=0", "stage.lr=1e-3", "stage.save_every=0", "stage.gain_every=0", "data.seed=2"]
    train(*common, f"hydra.run.dir={tmp_path / 'one'}")
    split = tmp_path / "split"
    train(*common, "stage.stop_before_generator=true", f"generator.path={early}", f"hydra.run.dir={split}")
    assert (split / "checkpoints" / "step-0000002").is_dir() and not (split / "final").exists()
    train(*common, "stage.save_every=3", "resume_generator=folder", f"hydra.run.dir={split}")
    assert "resume_generator=folder: the generator's weights from" in (split / "train.log").read_text()
    import shutil

    shutil.rmtree(split / "final")  # stopped after step 3 (its checkpoint), then the same command again
    (split / "metrics.jsonl").write_text("".join(line + "\n" for line in (split / "metrics.jsonl").read_text().splitlines()
                                                 if json.loads(line).get("step", 0) <= 3))
    train(*common, "stage.save_every=3", "resume_generator=folder", "resume=" + str(split / "checkpoints" / "step-0000003"),
          f"hydra.run.dir={split}")
    assert "are the ones in" in (split / "train.log").read_text()
    one, two = losses(tmp_path / "one"), losses(split)
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    assert all(abs(one[k] - two[k]) < 1e-5 for k in one), (one, two)
    finished = load_file(str(tiny_dir / "wan" / "transformer" / "diffusion_pytorch_model.safetensors"))
    for run in (tmp_path / "one", split):
        dit = load_file(str(run / "final" / "generator" / "transformer" / "diffusion_pytorch_model.safetensors"))
        assert all(torch.equal(finished[k], dit[k]) for k in finished)
    a, b = load_file(str(tmp_path / "one" / "final" / "connector" / "model.safetensors")), load_file(str(split / "final" / "connector" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    # resumed by a run that trains the DiT: the optimizer's groups differ, refused by name
    p = train(*[a for a in common if "trainable.generator" not in a], "resume=" + str(split / "checkpoints" / "step-0000003"),
              f"hydra.run.dir={tmp_path / 'other'}", check=False)
    assert p.returncode != 0 and "optimizer state does not fit this run's" in p.stderr + p.stdout, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and not (tmp_path / "other" / "final").exists()


def test_stage2_with_the_dit_frozen_steps_through_micro_batches_that_reach_no_trainable_weight(tiny, sft_run, tmp_path):
    """stage.trainable.generator=frozen with every request dropped (stage.p_drop_text=1): the warm-up has nothing to distil
    and the joint steps' flow loss reads zero states through a frozen DiT, so no trainable weight is reached; the loss
    still carries a (zero) graph and every step runs (DeepSpeed's backward refused a loss without one)."""
    train(tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp", f"init_from={sft_run}", "stage.max_steps=4",
          "stage.distill_steps=2", "stage.trainable.generator=frozen", "stage.distill_target=set", "stage.distill_weight=1.0",
          "stage.p_drop_text=1.0", "stage.warmup_steps=0", "stage.save_every=0", "stage.gain_every=0", f"hydra.run.dir={tmp_path}")
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]
    assert (tmp_path / "final").is_dir()


def test_resume_generator_folder_refuses_another_teacher_and_a_run_that_trained_on_its_generator(tiny, tiny_dir, sft_run, tmp_path):
    """resume_generator=folder refuses, by name and before any step: a checkpoint distilled onto another text encoder
    (the connector learnt another teacher's states) and one whose run already trained on its own copy of the generator."""
    other = _other_copy(tiny_dir, tmp_path / "other", encoder_seed=1)
    common = [tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp", f"init_from={sft_run}", "stage.max_steps=4",
              "stage.distill_steps=2", "stage.distill_target=set", "stage.distill_weight=1.0", "stage.warmup_steps=0",
              "stage.save_every=0", "stage.gain_every=0"]
    run = tmp_path / "teacher"
    train(*common, "stage.generator_frozen_steps=2", "stage.stop_before_generator=true", f"generator.path={other}", f"hydra.run.dir={run}")
    p = train(*common, "stage.generator_frozen_steps=2", "resume_generator=folder", f"hydra.run.dir={run}", check=False)
    assert p.returncode != 0 and "the connector was distilled onto another text encoder" in p.stderr + p.stdout
    assert "Traceback" not in p.stderr and not (run / "final").exists()
    run = tmp_path / "ran"  # step 3 runs another copy of the DiT (flow loss); its checkpoint, still within generator_frozen_steps
    early = _other_copy(tiny_dir, tmp_path / "early")
    train(*common, "stage.generator_frozen_steps=3", "stage.save_every=3", "stage.max_steps=4", f"generator.path={early}", f"hydra.run.dir={run}")
    p = train(*common, "stage.generator_frozen_steps=3", "stage.max_steps=5", "resume=" + str(run / "checkpoints" / "step-0000003"),
              "resume_generator=folder", f"hydra.run.dir={run}", check=False)
    assert p.returncode != 0 and "ran its generator in 1 steps" in p.stderr + p.stdout, p.stderr[-2000:]
    # the same checkpoint on the copy it ran: nothing to restore, nothing to refuse
    train(*common, "stage.generator_frozen_steps=3", "stage.max_steps=5", "resume=" + str(run / "checkpoints" / "step-0000003"),
          "resume_generator=folder", f"generator.path={early}", f"hydra.run.dir={run}")
    assert "the generator's weights in" in (run / "train.log").read_text() and "are the ones in" in (run / "train.log").read_text()
    # past generator_frozen_steps the generator's weights are the run's own: a stopped run goes on with the same command
    train(*common, "stage.generator_frozen_steps=2", "stage.max_steps=4", "resume=" + str(run / "checkpoints" / "step-0000003"),
          "resume_generator=folder", f"hydra.run.dir={run}")
    assert "its weights are this run's own, taken from the checkpoint" in (run / "train.log").read_text()


@pytest.mark.slow  # the fast tier resumes after SIGTERM and after a damaged checkpoint (tests/tools/test_faults.py)
def test_resume_after_sigkill_matches_uninterrupted_run(tiny, sft_run, tmp_path):
    common = [tiny, "stage=align", "generator=tiny_cosmos", "connector=queries", f"init_from={sft_run}", "stage.max_steps=10",
              "stage.save_every=2", "stage.lr=1e-3", "stage.warmup_steps=3", "stage.lr_schedule=cosine", "data.seed=3"]
    train(*common, f"hydra.run.dir={tmp_path / 'full'}")
    full = losses(tmp_path / "full")

    run = tmp_path / "killed"
    p = subprocess.Popen(cmd(*common, f"hydra.run.dir={run}"), cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        ckpts = list((run / "checkpoints").glob("step-*")) if (run / "checkpoints").is_dir() else []
        if ckpts and max(losses(run)) >= 5:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = max(losses(run))
    assert killed_at < 10, "the run finished before it could be killed"
    train(*common, f"hydra.run.dir={run}")  # resume=auto
    log = (run / "train.log").read_text()
    assert "resumed from" in log
    resumed = losses(run)  # one row per step: rows after the checkpoint were replaced by the resumed process
    assert sorted(resumed) == list(range(1, 11))
    for step, loss in full.items():
        assert abs(resumed[step] - loss) < 1e-5, (step, resumed[step], loss)
    assert json.loads((run / "summary.json").read_text())["steps"] == 10


@pytest.mark.slow
def test_stage2_buckets_batch_within_a_bucket_and_resume_exactly(tiny, sft_run, tmp_path):
    """data.buckets on a data set with three aspect ratios through the trainer (its bucket sampler, from the feature cache's
    records): a run stopped by SIGTERM and resumed gives the losses of the uninterrupted run. (Batches within one bucket:
    tests/fusion/test_buckets.py.)"""
    from tests.fusion.test_buckets import BUCKETS, write_ragged_data

    (tmp_path / "data").mkdir()
    data = write_ragged_data(tmp_path / "data")
    common = [tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp", f"init_from={sft_run}", "data=jsonl", f"data.path={data}",
              f"data.buckets=[{','.join(BUCKETS)}]", "stage.micro_batch_size=3", "stage.max_steps=8", "stage.save_every=3",
              "stage.lr=1e-3", "cache=auto", f"cache.dir={tmp_path / 'cache'}", "data.seed=5"]
    train(*common, f"hydra.run.dir={tmp_path / 'full'}")
    log = (tmp_path / "full" / "train.log").read_text()
    assert "aspect-ratio buckets (samples each): 64x64: 4, 64x96: 4, 96x64: 4" in log
    full = losses(tmp_path / "full")
    run = stop_then_resume(common, tmp_path / "stopped", step=5)
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 9))
    for step, loss in full.items():
        assert abs(resumed[step] - loss) < 1e-5, (step, resumed[step], loss)


@pytest.mark.slow
def test_offload_preset_runs(tiny, tmp_path):
    # zero3_offload: parameters and optimizer states on the CPU, with the toolkit's own (NaN-guarded) AdamW
    train(tiny, "stage=sft", "deepspeed=zero3_offload", "stage.max_steps=2", f"hydra.run.dir={tmp_path}")
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2


def test_partial_checkpoint_is_never_resumed(tiny, sft_run, tmp_path):
    common = [tiny, "stage=sft", "stage.max_steps=4", "stage.save_every=2", f"hydra.run.dir={tmp_path}"]
    train(*common)
    ck = tmp_path / "checkpoints"
    (ck / "step-0000002" / "complete.json").unlink()  # as if the process died before marking it complete
    (ck / ".partial-0000004").mkdir()
    from fusion.train import Trainer
    from omegaconf import OmegaConf

    t = Trainer(OmegaConf.create({"output_dir": str(tmp_path)}))
    assert t.complete_checkpoints() == []


def write_bad_data(tiny_dir: Path, folder: Path) -> Path:
    src = (tiny_dir / "demo_data" / "conversations.jsonl").read_text().splitlines()
    (folder / "images").mkdir(parents=True)
    for png in (tiny_dir / "demo_data" / "images").iterdir():
        (folder / "images" / png.name).write_bytes(png.read_bytes())
    (folder / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    bad = [
        "{not json",
        src[0].replace("red_circle.png", "missing.png"),
        src[0].replace("red_circle.png", "corrupt.png"),
        json.dumps({"messages": [{"role": "user", "content": "word " * 3000},
                                 {"role": "assistant", "content": [{"type": "image", "image": "images/red_circle.png"}]}]}),
    ]
    from PIL import Image

    Image.new("RGB", (128, 128)).save(folder / "images" / "big.png")  # over data.max_image_pixels=10000 (the demo images are 64x64)
    item = '{"type": "text", "text": "hi"}'
    bad += [  # issue 19's kinds
        '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "x"}]}',  # invalid_unicode
        '{"messages": [{"role": "user", "content": "a"}], "messages": [{"role": "assistant", "content": "b"}]}',  # duplicate_key
        '{"messages": [{"role": "user", "content": [{"image": "images/red_circle.png"}]}, {"role": "assistant", "content": "x"}]}',
        f'{{"messages": [{{"role": "user", "content": [{item}]}}]}}',  # no_assistant_turn: stage 1 skips it even under on_error=error
        src[0].replace("red_circle.png", "big.png"),  # image_too_large
    ]
    path = folder / "data.jsonl"
    lines = [line.encode() for line in src + bad] + [b'{"messages": [{"role": "user", "content": "caf\xe9"}]}']  # invalid_utf8
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # a UTF-8 byte-order mark first, as Windows editors write
    return path


def test_bad_data_skip_finishes_and_counts_each_kind(tiny, tiny_dir, tmp_path):
    data = write_bad_data(tiny_dir, tmp_path / "data")
    train(tiny, "stage=sft", "stage.max_steps=3", f"data.path={data}", "data.on_error=skip", "data.max_image_pixels=10000",
          f"hydra.run.dir={tmp_path / 'run'}")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped"] == {"json": 1, "missing_image": 1, "bad_image": 1, "too_long": 1, "invalid_utf8": 1, "invalid_unicode": 1,
                                  "duplicate_key": 1, "schema": 1, "no_assistant_turn": 1, "image_too_large": 1}
    assert summary["steps"] == 3  # line 1 starts with a UTF-8 byte-order mark and trains
    assert "skipped 10 samples" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.parametrize("cache", [pytest.param("off", marks=pytest.mark.slow), "auto"])  # off: the stage-1 path, tested above
def test_stage2_bad_data_skip_counts_each_kind_with_and_without_the_cache(tiny, tiny_dir, sft_run, tmp_path, cache):
    data = write_bad_data(tiny_dir, tmp_path / "data")
    run = tmp_path / "run"
    train(tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp", f"init_from={sft_run}", "stage.max_steps=2", "stage.gain_every=0",
          f"data.path={data}", "data.on_error=skip", "data.max_image_pixels=10000", f"cache={cache}", f"cache.dir={tmp_path / 'cache'}",
          f"hydra.run.dir={run}")
    summary = json.loads((run / "summary.json").read_text())
    faults = {"json": 1, "missing_image": 1, "bad_image": 1, "too_long": 1, "invalid_utf8": 1, "invalid_unicode": 1, "duplicate_key": 1,
              "schema": 1, "image_too_large": 1}
    assert {k: v for k, v in summary["skipped"].items() if k != "no_target"} == faults  # the same kinds as stage 1
    assert summary["skipped"]["no_target"] >= 1  # the line with no assistant turn has nothing to draw: stage 2's own kind
    assert summary["steps"] == 2 and (summary["feature_cache"] is not None) == (cache == "auto")
    p = train(tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp", f"init_from={sft_run}", f"data.path={data}",
              f"cache={cache}", f"cache.dir={tmp_path / 'cache2'}", f"hydra.run.dir={tmp_path / 'strict'}", check=False)
    assert p.returncode == 2 and f"{data}:{len(src_lines(tiny_dir)) + 1}: not valid JSON" in p.stderr and "Traceback" not in p.stderr


def test_bad_data_error_stops_before_the_first_step(tiny, tiny_dir, tmp_path):
    data = write_bad_data(tiny_dir, tmp_path / "data")
    p = train(tiny, "stage=sft", f"data.path={data}", "data.on_error=error", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert p.returncode == 2
    assert f"error: {data}:{len(src_lines(tiny_dir)) + 1}: not valid JSON" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("mllm", [pytest.param("tiny", marks=pytest.mark.slow), "tiny_qwen3_vl"])  # tiny: the tests above, in detail
def test_both_stages_train_and_export_for_each_mllm_family(tiny, tmp_path, mllm):
    train(tiny, f"mllm={mllm}", "stage=sft", "stage.max_steps=2", "stage.save_every=0", f"hydra.run.dir={tmp_path / 'sft'}")
    assert sorted(losses(tmp_path / "sft")) == [1, 2]
    train(tiny, f"mllm={mllm}", "stage=align", "generator=tiny_wan", "connector=last_mlp", f"init_from={tmp_path / 'sft'}", "stage.max_steps=2",
          "stage.save_every=0", "stage.gain_every=0", f"hydra.run.dir={tmp_path / 'align'}")
    assert sorted(losses(tmp_path / "align")) == [1, 2]
    manifest = json.loads((tmp_path / "align" / "final" / "unifuse.json").read_text())
    from hydra.utils import get_class

    from fusion.model import FusedModel
    from tests.conftest import MLLM_FAMILIES

    family = {v[1]: k for k, v in MLLM_FAMILIES.items()}[mllm]
    model = FusedModel.from_pretrained(tmp_path / "align" / "final")
    assert type(model.mllm) is get_class(MLLM_FAMILIES[family][0]) and manifest["parts"]["generator"]
    assert json.loads((tmp_path / "align" / "final" / "mllm" / "config.json").read_text())["model_type"] == family


def test_align_without_or_with_wrong_init_from_fails_early(tiny, tmp_path):
    p = train(tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp", f"hydra.run.dir={tmp_path}", check=False)
    assert p.returncode == 2 and "stage=align needs init_from=" in p.stderr
    p = train(tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp", f"init_from={tmp_path}", f"hydra.run.dir={tmp_path}", check=False)
    assert p.returncode == 2 and "no unifuse.json" in p.stderr


@pytest.mark.slow
def test_connector_sweep_writes_one_folder_per_run(tiny, sft_run, tmp_path):
    train("-m", tiny, "stage=align", "generator=tiny_sana", "connector=last_mlp,layer_mix", f"init_from={sft_run}", "stage.max_steps=2",
          f"hydra.sweep.dir={tmp_path}")
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "summary.json").is_file())
    assert len(runs) == 2
    kinds = {json.loads((r / "final" / "unifuse.json").read_text())["parts"]["connector"]["spec"]["_target_"] for r in runs}
    assert kinds == {"connectors.last_mlp.LastMLP", "connectors.layer_mix.LayerMix"}


@pytest.mark.slow
@pytest.mark.parametrize("zero, frames", [("zero3", "all"), ("zero2", "learned")])
def test_two_processes_with_torchrun_gloo(tiny, sft_run, tmp_path, zero, frames):
    """Two ranks; under ZeRO-2 the learned frame head among the parts DeepSpeed reduces (ZeRO-3 refuses it on several ranks:
    test_learned_frames_under_zero3_on_several_ranks_are_refused)."""
    e = env()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "tools" / "train.py"), tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp",
                        f"init_from={sft_run}", "stage.max_steps=4", "stage.save_every=2", f"deepspeed={zero}",
                        f"stage.frame_select={frames}", f"hydra.run.dir={tmp_path}"],
                       cwd=REPO, env=e, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    assert json.loads((tmp_path / "checkpoints" / "step-0000002" / "complete.json").read_text())["world_size"] == 2
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4]


def test_learned_frames_under_zero3_on_several_ranks_are_refused(tiny, sft_run, tmp_path):
    """The head's calls differ in number between ranks; ZeRO-3's per-call all-gathers would hang or mismatch: refused
    before anything loads, naming the keys."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "tools" / "train.py"), tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp",
                        f"init_from={sft_run}", "deepspeed=zero3", "stage.frame_select=learned", f"hydra.run.dir={tmp_path}"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    assert "stage.frame_select=learned with deepspeed.zero_stage=3 on 2 ranks is not supported" in p.stderr + p.stdout
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "final").exists()


def src_lines(tiny_dir: Path) -> list[str]:
    return (tiny_dir / "demo_data" / "conversations.jsonl").read_text().splitlines()


def test_stage2_feature_cache_build_use_and_stale(tiny, tiny_dir, sft_run, tmp_path):
    """cache=build and cache=use train with the same losses (equal to the uncached path's: tests/fusion/test_feature_cache.py,
    and the slow tier's cache=off run here); cache=use never loads the MLLM; a changed data file is refused."""
    demo = tiny_dir / "demo_data"
    data = tmp_path / "data.jsonl"
    data.write_text((demo / "conversations.jsonl").read_text())
    common = [tiny, "stage=align", "generator=tiny_wan", "connector=multilayer_concat", f"init_from={sft_run}", "stage.max_steps=4",
              "stage.warmup_steps=0", "stage.save_every=0", f"data.path={data}", f"data.image_root={demo}", f"cache.dir={tmp_path / 'cache'}"]
    train(*common, "cache=build", f"hydra.run.dir={tmp_path / 'build'}")
    train(*common, "cache=use", f"hydra.run.dir={tmp_path / 'use'}")
    built, used = (losses(tmp_path / n) for n in ("build", "use"))
    assert sorted(built) == [1, 2, 3, 4]
    for step in built:
        assert abs(built[step] - used[step]) < 1e-6, (built, used)
    sb = json.loads((tmp_path / "build" / "summary.json").read_text())["feature_cache"]
    su = json.loads((tmp_path / "use" / "summary.json").read_text())["feature_cache"]
    assert sb["built"] and not su["built"] and sb["key"] == su["key"]
    assert "MLLM not loaded" in (tmp_path / "use" / "train.log").read_text()
    from fusion.model import FusedModel

    m = FusedModel.from_pretrained(tmp_path / "use" / "final")  # the frozen MLLM's folder was copied into the export
    assert m.mllm.bov_token_id > 0 and type(m.connector).__name__ == "MultilayerConcat"

    data.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")  # the data changed: the cache is stale
    p = train(*common, "cache=use", f"hydra.run.dir={tmp_path / 'stale'}", check=False)
    assert p.returncode == 2 and "stale: data changed" in p.stderr, p.stderr[-2000:]


def test_stage2_distill_data_joins_the_warm_up_only_cached_or_not(tiny, tiny_dir, sft_run, tmp_path):
    """stage.distill_data: its text-only lines (the drawing an image item without a file) join every warm-up micro-batch,
    distill_data_batch of them, and no step after the warm-up; they change the warm-up's loss; the cached and the
    uncached paths train alike (the stand-in drawing read the same way)."""
    corpus = tmp_path / "distill.jsonl"
    corpus.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": f"Draw a {colour} {shape} at the top."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Here it is."}, {"type": "image"}]}]}) + "\n"
        for colour, shape in (("yellow", "circle"), ("purple", "triangle"), ("green", "square"))))
    demo = tiny_dir / "demo_data"
    common = [tiny, "stage=align", "generator=tiny_wan", "connector=multilayer_concat", "connector.refiner_layers=1", f"init_from={sft_run}",
              "stage.max_steps=4", "stage.warmup_steps=0", "stage.save_every=0", "stage.gain_every=0", "stage.distill_steps=3",
              "stage.distill_target=aligned", f"data.path={demo / 'conversations.jsonl'}", f"data.image_root={demo}",
              f"cache.dir={tmp_path / 'cache'}"]
    corpus_args = [f"stage.distill_data={corpus}", "stage.distill_data_batch=2"]
    train(*common, *corpus_args, "cache=off", f"hydra.run.dir={tmp_path / 'off'}")
    train(*common, *corpus_args, "cache=build", f"hydra.run.dir={tmp_path / 'built'}")
    train(*common, "cache=use", f"hydra.run.dir={tmp_path / 'plain'}")  # the data's cache, built by the run before
    rows = [json.loads(line) for line in (tmp_path / "off" / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["distill_data"] for r in rows if "loss" in r} == {1: 2, 2: 2, 3: 2, 4: 0}
    off, built, plain = (losses(tmp_path / n) for n in ("off", "built", "plain"))
    for step in off:
        assert abs(off[step] - built[step]) < 1e-4, (off, built)
    assert abs(built[1] - plain[1]) > 1e-4  # the same data batch, plus the corpus's two
    assert "distillation data: 3 conversations" in (tmp_path / "built" / "train.log").read_text()
    info = json.loads((tmp_path / "built" / "summary.json").read_text())["feature_cache"]
    assert info["distill_data"]["built"] and info["distill_data"]["samples"] == 3 and info["distill_data"]["key"] != info["key"]


def test_stage2_distill_data_refuses_a_missing_file_and_a_line_without_a_drawing_by_name(tiny, sft_run, tmp_path):
    common = [tiny, "stage=align", "generator=tiny_wan", "connector=last_mlp", f"init_from={sft_run}", "stage.max_steps=1",
              "stage.distill_steps=1", "stage.distill_target=aligned", "stage.gain_every=0", "cache=off", f"hydra.run.dir={tmp_path / 'run'}"]
    p = train(*common, f"stage.distill_data={tmp_path / 'nowhere.jsonl'}", check=False)
    assert p.returncode == 2 and "stage.distill_data: file not found" in p.stderr and "make_toy" in p.stderr, p.stderr[-2000:]
    corpus = tmp_path / "distill.jsonl"
    corpus.write_text(json.dumps({"messages": [{"role": "user", "content": "Draw a red circle."},
                                               {"role": "assistant", "content": [{"type": "text", "text": "Here it is."}, {"type": "image"}]}]})
                      + "\n" + json.dumps({"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]}) + "\n")
    p = train(*common, f"stage.distill_data={corpus}", check=False)
    assert p.returncode == 2 and f"{corpus}:2: stage.distill_data: no assistant drawing" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    train(*common, f"stage.distill_data={corpus}", "data.on_error=skip")  # counted and left out
    assert "distillation data: 1 conversations" in (tmp_path / "run" / "train.log").read_text()


@pytest.mark.slow
def test_stage2_cached_run_has_the_losses_of_the_uncached_run(tiny, tiny_dir, sft_run, tmp_path):
    demo = tiny_dir / "demo_data"
    common = [tiny, "stage=align", "generator=tiny_wan", "connector=multilayer_concat", f"init_from={sft_run}", "stage.max_steps=4",
              "stage.warmup_steps=0", "stage.save_every=0", f"data.path={demo / 'conversations.jsonl'}", f"data.image_root={demo}",
              f"cache.dir={tmp_path / 'cache'}"]
    train(*common, "cache=off", f"hydra.run.dir={tmp_path / 'off'}")
    train(*common, "cache=build", f"hydra.run.dir={tmp_path / 'build'}")
    off, built = losses(tmp_path / "off"), losses(tmp_path / "build")
    assert sorted(off) == [1, 2, 3, 4]
    for step in off:
        assert abs(off[step] - built[step]) < 1e-4, (off, built)


@pytest.mark.slow
def test_query_connectors_train_from_the_key_value_cache_with_the_uncached_losses(tiny, tiny_dir, sft_run, tmp_path):
    demo = tiny_dir / "demo_data"
    common = [tiny, "stage=align", "generator=tiny_wan", "connector=queries", f"init_from={sft_run}", "stage.max_steps=3", "stage.save_every=0",
              "stage.warmup_steps=0", f"data.path={demo / 'conversations.jsonl'}", f"data.image_root={demo}", f"cache.dir={tmp_path / 'cache'}"]
    train(*common, "cache=off", f"hydra.run.dir={tmp_path / 'off'}")
    train(*common, "cache=build", f"hydra.run.dir={tmp_path / 'kv'}")
    assert "key/value cache" in (tmp_path / "kv" / "train.log").read_text()
    assert json.loads((tmp_path / "kv" / "summary.json").read_text())["feature_cache"]["built"]
    off, kv = losses(tmp_path / "off"), losses(tmp_path / "kv")
    assert sorted(off) == [1, 2, 3]
    for step in off:
        assert abs(off[step] - kv[step]) < 1e-4, (off, kv)


def test_lora_stage_1_under_zero3_on_two_ranks_changes_only_the_bov_rows(tiny, tiny_dir, tmp_path):
    """The row mask of a LoRA stage 1 (fusion/model.py ``_train_token_rows``) holds with partitioned parameters, reduced
    gradients and weight decay: of both embedding matrices the export differs from the start in the <|bov|> row alone."""
    from backbones.mllm.qwen2_5_vl import Qwen25VLAdapter

    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(REPO / "tools" / "train.py"), tiny, "stage=sft", "stage.max_steps=3", "stage.trainable.mllm=lora",
                        "stage.lr=0.01", "stage.weight_decay=0.1", "deepspeed=zero3", f"hydra.run.dir={tmp_path}"],
                       cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    start = Qwen25VLAdapter.from_pretrained(str(tiny_dir / "qwen2_5_vl"))  # <|bov|> added at the mean row, as stage 1 begins
    end = Qwen25VLAdapter.from_pretrained(str(tmp_path / "final" / "mllm"))
    bov = start.bov_token_id
    assert end.bov_token_id == bov
    for get in ("get_input_embeddings", "get_output_embeddings"):
        a, b = getattr(start.model, get)().weight, getattr(end.model, get)().weight
        assert (a != b).any(dim=1).nonzero().flatten().tolist() == [bov], get
