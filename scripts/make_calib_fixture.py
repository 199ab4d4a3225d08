#!/usr/bin/env python3
"""Writes stages/tests/fixtures/calib_tiny_ids.json: the token ids transformers produces
for the first N non-empty captions of data/calibration/captions.txt with the embedded tiny
checkpoint's tokenizer, under build-calib's settings (padding="max_length",
truncation=True, left padding, right truncation). The Rust test
`build_calib::tests::ids_match_transformers` asserts build-calib produces the same.

Optional: needs python3 with transformers. Run from the repository root:

    python3 scripts/make_calib_fixture.py
"""
import json
import pathlib

import transformers
from transformers import AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
CKPT = ROOT / "models/tiny_qwen3_vl/checkpoint"
CAPTIONS = ROOT / "data/calibration/captions.txt"
OUT = ROOT / "stages/tests/fixtures/calib_tiny_ids.json"
N, MAX_LENGTH = 8, 24


def main():
    # build-calib's reading rule: skip lines that are blank after stripping whitespace,
    # keep the others minus their line ending.
    lines = [l.rstrip("\r\n") for l in CAPTIONS.read_text(encoding="utf-8").splitlines(keepends=True)]
    captions = [l for l in lines if l.strip()][:N]
    tok = AutoTokenizer.from_pretrained(str(CKPT))
    tok.padding_side = "left"
    tok.truncation_side = "right"
    enc = tok(captions, padding="max_length", truncation=True, max_length=MAX_LENGTH)
    unpadded = [len(tok(c)["input_ids"]) for c in captions]
    fixture = {
        "generator": "scripts/make_calib_fixture.py",
        "transformers_version": transformers.__version__,
        "checkpoint": "models/tiny_qwen3_vl/checkpoint",
        "captions_path": "data/calibration/captions.txt",
        "max_samples": N,
        "max_length": MAX_LENGTH,
        "padding_side": "left",
        "truncation_side": "right",
        "pad_token_id": tok.pad_token_id,
        "captions": captions,
        "unpadded_lengths": unpadded,
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
    }
    assert any(n > MAX_LENGTH for n in unpadded), "the fixture should exercise truncation"
    assert any(n < MAX_LENGTH for n in unpadded), "the fixture should exercise padding"
    OUT.write_text(json.dumps(fixture, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
