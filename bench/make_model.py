"""Create the benchmark model once: t5-small shapes, random weights, the real T5 tokenizer.

Every benchmark loads this same directory, so all tools run the same weights. Uses t5qa's own
`init_model` when t5qa is importable (what a t5qa user runs), else the transformers equivalent.
CTranslate2 copies (int8, float32) are converted here too, outside any timed region.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import common


def make_model(output: Path, preset: str = "t5-small") -> str:
    try:
        from t5qa.modeling import init_model
    except ImportError:
        init_model = None
    if init_model is not None:
        init_model(preset, str(common.TOKENIZER_DIR), output, seed=0)
        return "t5qa.modeling.init_model"
    import torch
    from transformers import AutoConfig, AutoTokenizer, T5ForConditionalGeneration

    if preset != "t5-small":
        raise SystemExit(f"the {preset} preset needs t5qa (src/ on PYTHONPATH)")
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(AutoConfig.from_pretrained(common.TOKENIZER_DIR))
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(common.TOKENIZER_DIR).save_pretrained(output)
    return "transformers T5ForConditionalGeneration(AutoConfig)"


def convert_ct2(model_dir: Path, output: Path, quantization: str) -> str:
    try:
        from t5qa import export
    except ImportError:
        export = None
    if export is not None and hasattr(export, "export_ct2"):
        export.export_ct2(model_dir, output, quantization=quantization, force=True)
        return "t5qa.export.export_ct2"
    import ctranslate2

    ctranslate2.converters.TransformersConverter(str(model_dir)).convert(str(output), quantization=quantization)
    return "ctranslate2.converters.TransformersConverter"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", required=True, help="directory for the model (and ct2-int8/, ct2-float32/ beside)")
    parser.add_argument("--out", required=True, help="result JSON path")
    parser.add_argument("--ct2", action="store_true", help="also convert CTranslate2 copies")
    parser.add_argument("--preset", default="t5-small", help="t5qa init-model preset (bench/gpu.py: t5-base)")
    args = parser.parse_args()
    common.set_threads()
    output = Path(args.output)
    info = {"name": "make_model", "kind": "setup", "model_dir": str(output),
            "made_by": make_model(output, args.preset)}
    if args.ct2:
        for quant in ("int8", "float32"):
            target = output.parent / f"ct2-{quant}"
            try:
                info[f"ct2_{quant}"] = str(target)
                info[f"ct2_{quant}_by"] = convert_ct2(output, target, quant)
            except Exception as exc:  # noqa: BLE001 - reported, the CT2 benchmarks are then skipped
                info[f"ct2_{quant}_error"] = f"{type(exc).__name__}: {exc}"
                info.pop(f"ct2_{quant}")
    info["versions"] = common.versions()
    info["config"] = json.loads((output / "config.json").read_text())
    common.write_result(args.out, info)


if __name__ == "__main__":
    main()
