# Standalone: tiny Qwen3-VL config -> model -> forward with one small image (no tokenizer needed).
import torch
from PIL import Image
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen2VLImageProcessor, DynamicCache

torch.manual_seed(0)
# special-token ids inside a tiny vocab (the real ones are 151643.. ; any distinct ids < vocab_size work)
IM_START, IM_END, VS, VE, IMG, VID, PAD = 1, 2, 3, 4, 5, 6, 0
config = Qwen3VLConfig(
    text_config=dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,          # head_dim is NOT derived: set it
        max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                         "mrope_section": [4, 2, 2],       # sums to head_dim // 2 (published: [24, 20, 20] for 128)
                         "mrope_interleaved": True},       # accepted; modeling code is always interleaved
        pad_token_id=PAD, eos_token_id=IM_END, tie_word_embeddings=False,
    ),
    vision_config=dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2,      # vision head_dim (16) must be divisible by 4
        in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
        out_hidden_size=64,                                # = text hidden_size
        num_position_embeddings=64,                        # a perfect square (8 x 8 learned grid, bilinear-resampled)
        deepstack_visual_indexes=[0, 1],                   # vision blocks tapped; len <= text num_hidden_layers
    ),
    image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE,
    tie_word_embeddings=False,
)
model = Qwen3VLForConditionalGeneration(config).eval()

ip = Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2,
                           image_mean=[0.5] * 3, image_std=[0.5] * 3, min_pixels=64 * 64, max_pixels=128 * 128)
px = ip(images=[Image.new("RGB", (96, 64), (200, 30, 30))], return_tensors="pt")
n_img = int(px["image_grid_thw"].prod()) // 4                     # merge 2x2 -> 6 tokens for a 96x64 image
ids = torch.tensor([[IM_START, 10, 11, VS] + [IMG] * n_img + [VE, 12, 13, IM_END]])
mm = (ids == IMG).int()
with torch.no_grad():
    out = model(input_ids=ids, mm_token_type_ids=mm, use_cache=False, output_hidden_states=True, **px)
    pos, delta = model.model.get_rope_index(ids, mm, image_grid_thw=px["image_grid_thw"])
print("grid", px["image_grid_thw"].tolist(), "pixel_values", tuple(px["pixel_values"].shape))
print("logits", tuple(out.logits.shape), "hidden_states", len(out.hidden_states), "rope_delta", delta.item())
print("T/H/W positions:", pos[:, 0].tolist())

# cached: [text] [image span] [text], explicit positions = span positions + next free position
cache, nxt, chunks = DynamicCache(config=config), 0, []
with torch.no_grad():
    for a, b, img in [(0, 4, False), (4, 5 + n_img, True), (5 + n_img, ids.shape[1], False)]:
        s = ids[:, a:b]
        p = (model.model.get_rope_index(s, (s == IMG).int(), image_grid_thw=px["image_grid_thw"])[0] if img
             else torch.arange(s.shape[1]).view(1, 1, -1).expand(3, 1, -1)) + nxt
        o = model(input_ids=s, position_ids=p, cache=cache, use_cache=True, **(px if img else {}))
        cache, nxt = o.cache, int(p.max()) + 1
        chunks.append(o.logits)
print("cached vs full max|diff|: %.2e" % (torch.cat(chunks, 1) - out.logits).abs().max())
