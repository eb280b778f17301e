"""Does a set-distilled fixed-token connector fail because its 'empty' tokens are not empty?
python docs/dev/toy_connector_gate_diag.py <run>/final [n=24] [test.jsonl]   (docs/toyworld_log.md, "A shorter joint phase")"""
import sys, types
import torch
from backbones.generator.text_encoder import TextEncoder
from fusion.data import load_images, read_jsonl
from fusion.gain import conditioning_gain
from fusion.model import FusedModel

path = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 24
model = FusedModel.from_pretrained(path)
src = model.generator_source
model.set_teacher(TextEncoder.from_pretrained(src, device=model.generator.device))
convs = [c for c in read_jsonl(sys.argv[3] if len(sys.argv) > 3 else "checkpoints/toy/toyworld/test.jsonl") if c.num_target_images()][:n]
g = torch.Generator().manual_seed(0)
samples = [model.prepare_align_sample(load_images(c), g) for c in convs]
norm = model.connector.norm
orig = norm.forward
gates = []
def fwd(self, x, tau=None, keep=None):
    gate = torch.sigmoid(self.gate(x))
    gates.append(gate.detach()[..., 0])
    out = self.norm(x) * gate
    if tau is not None:
        out = out * (gate >= tau)
    if keep is not None:  # keep the k highest gates (k: the teacher's real token count of this sample)
        k = min(keep.pop(0), gate.shape[-2])
        idx = gate[..., 0].topk(k, dim=-1).indices
        m = torch.zeros_like(gate[..., 0]).scatter_(-1, idx, 1.0)[..., None]
        out = out * m
    return out
with torch.no_grad():
    norm.forward = types.MethodType(fwd, norm)
    real = []
    for s in samples:
        gates.clear()
        st, mk = model.sample_states(s)[:2]
        ts, tm = model._teacher_states(s.request)
        real.append(int(tm.sum()))
        gv = gates[-1][0]
        print(f"teacher real {real[-1]:2d} | gates >0.5: {int((gv > 0.5).sum()):2d} >0.2: {int((gv > 0.2).sum()):2d} | "
              f"sorted gates {[round(float(x), 2) for x in gv.sort(descending=True).values[:real[-1] + 4]]}")
    for tau in (None, 0.2, 0.35, 0.5):
        norm.forward = types.MethodType(lambda self, x, tau=tau: fwd(self, x, tau=tau), norm)
        r = conditioning_gain(model, samples, ts=(0.5, 0.7, 0.9))
        print(f"tau={tau}: gain@0.5/0.7/0.9 {r['gain@0.5']:.3f}/{r['gain@0.7']:.3f}/{r['gain@0.9']:.3f} "
              f"reference {r.get('reference_gain@0.7', float('nan')):.3f} shuffle {r['shuffle_gain@0.7']:.3f}")
    norm.forward = types.MethodType(lambda self, x, ks=list(real): fwd(self, x, keep=ks), norm)
    r = conditioning_gain(model, samples, ts=(0.5, 0.7, 0.9))
    print(f"top-k (k = teacher's real count): gain@0.5/0.7/0.9 {r['gain@0.5']:.3f}/{r['gain@0.7']:.3f}/{r['gain@0.9']:.3f}")
