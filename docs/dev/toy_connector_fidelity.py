"""How close does a connector's output set get to the teacher's set? (greedy one-to-one match as set_distill_loss)
python docs/dev/toy_connector_fidelity.py <run>/final [n=24] [test.jsonl]   (docs/toyworld_log.md, "A shorter joint phase")"""
import sys
import torch
from backbones.generator.text_encoder import TextEncoder
from fusion.data import load_images, read_jsonl
from fusion.gain import conditioning_gain
from fusion.model import FusedModel

model = FusedModel.from_pretrained(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 24
model.set_teacher(TextEncoder.from_pretrained(model.generator_source, device=model.generator.device))
convs = [c for c in read_jsonl(sys.argv[3] if len(sys.argv) > 3 else "checkpoints/toy/toyworld/test.jsonl") if c.num_target_images()][:n]
g = torch.Generator().manual_seed(0)
samples = [model.prepare_align_sample(load_images(c), g) for c in convs]
mses, coss, extra, rms_t = [], [], [], []
with torch.no_grad():
    for s in samples:
        st, mk = model.sample_states(s)[:2]
        ts, tm = model._teacher_states(s.request)
        out = st[0].float()[mk[0].bool()]
        real = ts[0].float()[tm[0].bool()]
        cost = torch.cdist(real, out).pow(2)
        used = torch.zeros(len(out), dtype=torch.bool)
        for _ in range(min(len(real), len(out))):
            k, t = divmod(int(cost.argmin()), cost.shape[1])
            mses.append(float((real[k] - out[t]).pow(2).mean()))
            coss.append(float(torch.nn.functional.cosine_similarity(real[k], out[t], dim=0)))
            used[t] = True
            cost[k, :] = float("inf")
            cost[:, t] = float("inf")
        extra.append(float(out[~used].pow(2).mean(-1).sqrt().sum()) if (~used).any() else 0.0)
        rms_t.append(float(real.pow(2).mean(-1).sqrt().mean()))
    print(f"{sys.argv[1]}: matched tokens {len(mses)}: mse/dim {sum(mses)/len(mses):.4f}, cosine {sum(coss)/len(coss):.3f} "
          f"(min {min(coss):.3f}); teacher token rms {sum(rms_t)/len(rms_t):.3f}; unmatched outputs' rms summed per sample {sum(extra)/len(extra):.3f}")
    # the teacher with noise of the same mse: how much error does the DiT tolerate?
    sig = (sum(mses) / len(mses)) ** 0.5
    orig = model._teacher_states
    for scale in (0.0, 1.0):
        def noisy(req, scale=scale):
            a, b = orig(req)
            gen = torch.Generator().manual_seed(len(req))
            return a + scale * sig * torch.randn(a.shape, generator=gen) * b[..., None], b
        model.sample_states = lambda smp, noisy=noisy: (*noisy(smp.request), None)
        r = conditioning_gain(model, samples, ts=(0.5, 0.7, 0.9))
        print(f"teacher + noise {scale * sig:.3f}: gain@0.5/0.7/0.9 {r['gain@0.5']:.3f}/{r['gain@0.7']:.3f}/{r['gain@0.9']:.3f}")
