#!/usr/bin/env python3
"""Writes the image-preprocessing fixture the Rust test `stages/tests/image_preprocess.rs` checks
`io::image` against:

- stages/tests/fixtures/images/*.png|*.jpg: a few small synthetic images made here from a seeded
  generator (no outside data): PNG RGB, PNG RGBA (alpha from 0 to 255), PNG grayscale, PNG palette
  with a tRNS chunk, a baseline 4:2:0 JPEG, a 4:2:2 JPEG larger than both configs' max_pixels (so it
  is downscaled), a progressive grayscale JPEG, and a PNG smaller than both configs' min_pixels (so it
  is upscaled). Odd sizes on purpose (37x91, 120x45, 200x160, ...).
- stages/tests/fixtures/image_configs/{tiny,qwen3vl}/preprocessor_config.json: two processor
  configs, one per `size` spelling transformers accepts:
    tiny     patch 8 / merge 2, `min_pixels` 1024 / `max_pixels` 16384, CLIP mean/std (the defaults)
    qwen3vl  patch 16 / merge 2, `size` {shortest_edge 4096, longest_edge 65536}, mean/std 0.5
- stages/tests/fixtures/image_preprocess.json: per image, the RGB pixels transformers feeds the
  processor (after its `convert_to_rgb`: alpha composited onto white), and per image and config what
  the slow (PIL) `Qwen2VLImageProcessorPil` produces: the resized uint8 image, `image_grid_thw` and
  `pixel_values` ([grid_h*grid_w, 3*temporal_patch_size*patch_size^2] float32) -- in full when it
  has at most FULL_MAX values, else its sum, sum of squares and STRIDED_SAMPLES values at the flat
  indices i * len // STRIDED_SAMPLES. Pixel buffers are summarised by a 64-bit FNV-1a hash of their HWC bytes, their
  sum and a strided sample, so each step (decode, resize, full preprocess) can be checked alone.
  For information it also records how far transformers' fast (torchvision) `Qwen2VLImageProcessor`
  is from the slow one on the same image (`fast_vs_slow_max_abs_diff`).

Floats are written as the shortest decimal that reads back to the same float32 (the script checks
that parsing it as float64 and rounding to float32 gives the value back, which is what the Rust test
does).

Optional: needs python3 with numpy, Pillow, transformers (and torch + torchvision for the fast
processor's numbers). Run from the repository root:

    python3 scripts/make_image_fixture.py
"""
import json
import math
import pathlib
import warnings

import numpy as np
import PIL
import transformers
from PIL import Image
from transformers.image_transforms import convert_to_rgb
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "stages/tests/fixtures"
IMAGES = FIXTURES / "images"
CONFIGS = FIXTURES / "image_configs"
OUT = FIXTURES / "image_preprocess.json"
SEED = 20260614
FULL_MAX = 10_000
STRIDED_SAMPLES = 256

CONFIG_FILES = {
    "tiny": {
        "image_processor_type": "Qwen2VLImageProcessor",
        "patch_size": 8,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": 1024,
        "max_pixels": 16384,
    },
    "qwen3vl": {
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "size": {"longest_edge": 65536, "shortest_edge": 4096},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 0.00392156862745098,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,
    },
}


def smooth(rng, h, w, c, noise):
    """Smooth waves plus seeded noise: resampling sees both edges and gradients, JPEGs stay small."""
    y = np.linspace(0.0, 1.0, h)[:, None, None]
    x = np.linspace(0.0, 1.0, w)[None, :, None]
    phase = rng.uniform(0.0, 2 * np.pi, size=(1, 1, c))
    freq = rng.uniform(2.0, 9.0, size=(1, 1, c))
    base = 127.5 + 110.0 * np.sin(3.0 * freq * x + phase) * np.cos(2.0 * freq * y * y - phase)
    base = base + rng.normal(0.0, noise, size=(h, w, c))
    return np.clip(np.round(base), 0, 255).astype(np.uint8)


def make_images(rng):
    """(file name, PIL save kwargs, image) for each fixture image, in order."""
    rgba = smooth(rng, 45, 120, 4, 6.0)
    rgba[..., 3] = np.tile(np.linspace(0, 255, 120).round().astype(np.uint8), (45, 1))  # alpha 0..255
    palette = Image.fromarray(smooth(rng, 48, 64, 3, 4.0)).quantize(colors=16, method=Image.Quantize.MEDIANCUT)
    palette.info["transparency"] = bytes([0, 64, 128, 255] + [255] * 12)
    return [
        ("rgb_37x91.png", {}, Image.fromarray(smooth(rng, 91, 37, 3, 10.0))),
        ("rgba_120x45.png", {}, Image.fromarray(rgba, "RGBA")),
        ("gray_200x160.png", {}, Image.fromarray(smooth(rng, 160, 200, 1, 3.0)[..., 0])),
        ("palette_64x48.png", {"transparency": palette.info["transparency"]}, palette),
        ("photo_131x97.jpg", {"quality": 90, "subsampling": 2}, Image.fromarray(smooth(rng, 97, 131, 3, 8.0))),
        ("large_317x251.jpg", {"quality": 80, "subsampling": 1}, Image.fromarray(smooth(rng, 251, 317, 3, 4.0))),
        ("gray_progressive_61x45.jpg", {"quality": 85, "progressive": True},
         Image.fromarray(smooth(rng, 45, 61, 1, 8.0)[..., 0])),
        ("tiny_19x23.png", {}, Image.fromarray(smooth(rng, 23, 19, 3, 12.0))),
    ]


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def f32_text(v) -> str:
    """Shortest decimal for a float32 that reads back (as float64, then rounded to float32) to it."""
    s = str(np.float32(v))
    assert np.float32(float(s)) == np.float32(v), (s, v)
    return s


def strided(n):
    """The flat indices a sample is taken at: i * n // STRIDED_SAMPLES for i < STRIDED_SAMPLES (all of them when
    n <= STRIDED_SAMPLES). Not written to the fixture: the reader recomputes them."""
    return [i * n // STRIDED_SAMPLES for i in range(STRIDED_SAMPLES)] if n > STRIDED_SAMPLES else list(range(n))


def u8_summary(hwc: np.ndarray):
    flat = np.ascontiguousarray(hwc, dtype=np.uint8).reshape(-1)
    idx = strided(flat.size)
    return {
        "shape": list(hwc.shape),
        "fnv1a64": fnv1a64(flat.tobytes()),
        "sum": int(flat.sum(dtype=np.int64)),
        "sample_value": [int(flat[i]) for i in idx],
    }


def f32_summary(values: np.ndarray):
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    out = {"shape": list(values.shape)}
    if flat.size <= FULL_MAX:
        out["values"] = [f32_text(v) for v in flat]
    else:
        as64 = flat.astype(np.float64)
        idx = strided(flat.size)
        out["sum"] = math.fsum(as64)
        out["sum_sq"] = math.fsum(as64 * as64)
        out["sample_value"] = [f32_text(flat[i]) for i in idx]
    return out


class RawJson(str):
    """A number already formatted as JSON text."""


def dumps(obj, indent=0):
    """json.dumps with floats given as RawJson kept verbatim and short lists on one line."""
    pad = " " * indent
    if isinstance(obj, RawJson):
        return str(obj)
    if isinstance(obj, dict):
        items = [f'{pad} {json.dumps(k)}: {dumps(v, indent + 1)}' for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(f"{pad} {dumps(v, indent + 1)}" for v in obj) + "\n" + pad + "]"
    if isinstance(obj, list):
        return "[" + ",".join(dumps(v, indent) for v in obj) + "]"
    return json.dumps(obj)


def rawify(obj):
    if isinstance(obj, dict):
        return {k: (RawJson("[" + ",".join(v) + "]") if k in ("values", "sample_value") and v and isinstance(v[0], str)
                    else rawify(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rawify(v) for v in obj]
    return obj


def main():
    warnings.simplefilter("ignore")
    rng = np.random.default_rng(SEED)
    IMAGES.mkdir(parents=True, exist_ok=True)
    for name, kwargs, im in make_images(rng):
        im.save(IMAGES / name, **kwargs)

    processors = {}
    for cfg_name, cfg in CONFIG_FILES.items():
        d = CONFIGS / cfg_name
        d.mkdir(parents=True, exist_ok=True)
        (d / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        slow = Qwen2VLImageProcessorPil.from_pretrained(str(d))
        try:
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

            fast = Qwen2VLImageProcessor.from_pretrained(str(d))
        except ImportError:  # no torch/torchvision: skip the fast processor's numbers
            fast = None
        processors[cfg_name] = (slow, fast)

    images = []
    for path in sorted(IMAGES.iterdir()):
        with Image.open(path) as im:
            im.load()
            rgb = convert_to_rgb(im, return_numpy=True)  # what the slow processor works on
            entry = {"file": f"images/{path.name}", "pil_mode": im.mode, "size_wh": list(im.size),
                     "decoded_rgb": u8_summary(rgb), "configs": {}}
            for cfg_name, (slow, fast) in processors.items():
                out = slow(images=[im], return_tensors="np")
                pv = np.asarray(out["pixel_values"], dtype=np.float32)
                grid = [int(v) for v in out["image_grid_thw"][0]]
                chw = np.moveaxis(rgb, -1, 0)
                resized = slow.resize(chw, size=slow.size, resample=slow.resample,
                                      factor=slow.patch_size * slow.merge_size)
                c = {
                    "grid_thw": grid,
                    "resized_u8": u8_summary(np.moveaxis(resized, 0, -1)),
                    "pixel_values": f32_summary(pv),
                }
                if fast is not None:
                    fpv = fast(images=[im], return_tensors="pt")["pixel_values"].float().numpy()
                    c["fast_vs_slow_max_abs_diff"] = float(np.abs(fpv - pv).max()) if fpv.shape == pv.shape \
                        else f"shape {list(fpv.shape)} vs {list(pv.shape)}"
                entry["configs"][cfg_name] = c
            images.append(entry)

    fixture = {
        "generator": "scripts/make_image_fixture.py",
        "transformers_version": transformers.__version__,
        "pillow_version": PIL.__version__,
        "numpy_version": np.__version__,
        "processor": "Qwen2VLImageProcessorPil (slow, PIL backend)",
        "seed": SEED,
        "full_max": FULL_MAX,
        "sample_rule": f"sample_value[i] is the value at flat index i * len // {STRIDED_SAMPLES} (every index when len <= {STRIDED_SAMPLES})",
        "configs": {k: f"image_configs/{k}/preprocessor_config.json" for k in CONFIG_FILES},
        "images": images,
    }
    OUT.write_text(dumps(rawify(fixture)) + "\n", encoding="utf-8")
    json.loads(OUT.read_text(encoding="utf-8"))  # the hand-rolled writer must produce valid JSON
    total = OUT.stat().st_size + sum(p.stat().st_size for p in IMAGES.iterdir())
    print(f"wrote {OUT.relative_to(ROOT)} and {len(images)} images ({total / 1024:.0f} KiB in all)")
    for e in images:
        for k, c in e["configs"].items():
            print(f"  {e['file']:34} {k:8} grid {c['grid_thw']}  fast-vs-slow {c.get('fast_vs_slow_max_abs_diff')}")


if __name__ == "__main__":
    main()
