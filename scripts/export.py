"""``tipsdistill-export``: export the student of a stage-2 checkpoint (any ZeRO stage).

Examples::

    # one checkpoint -> runs/x/export_step_00000400 (runs/x/export for the final step)
    tipsdistill-export runs/x/checkpoints/step_00000400
    # a run directory: its newest complete checkpoint (a run stopped early or killed)
    tipsdistill-export runs/x --out students/x
    # and upload the export (safetensors + config.json + model card) to the Hugging Face Hub
    tipsdistill-export runs/x --push-to-hub my-org/vit-b14-distilled
    # the student plus model.onnx (dense text-space features, global embeddings; dynamic batch), checked
    # with onnxruntime; a student export directory works too
    tipsdistill-export runs/x --format onnx --image-size 224 [--dynamic-size]
    # a pretraining run (recipe embedded-teacher) as an embedded-teacher folder
    tipsdistill-export runs/embedded_teacher --format embedded-teacher --out DIR

Writes the same files as the end of training (``distill.export``): ``model.safetensors``, ``config.json``
(timm's hub fields: ``timm.create_model("local-dir:DIR", pretrained=True)``), ``student_extras.safetensors``,
``README.md``. ``--weights`` picks the student or its full EMA copy (default: the run's ``checkpoint.export``,
``auto``: the EMA copy under ``ema.kind=full``). ``--format embedded-teacher`` writes an embedded-teacher
folder instead (``teachers.embedded``; ``build_teacher("embedded", path=DIR)``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass


@dataclass
class ExportConfig:
    """Everything ``tipsdistill-export`` takes (the Hub token excepted: it is never written down); the
    resolved config is saved as ``<export>/export_config.yaml``."""

    checkpoint: str = ""  # a checkpoint directory (.../checkpoints/step_XXXXXXXX) or a run directory
    out: str = ""  # "" = <run>/export_step_XXXXXXXX (<run>/export for the final step)
    push_to_hub: str = ""  # a Hub repo id to upload the export to
    private: bool = False
    weights: str = ""  # "" = the run's checkpoint.export; auto | student | ema
    format: str = "student"  # student | embedded-teacher | onnx
    image_size: int = 0  # onnx: the input side the graph is traced at; 0 = the run's data.image_size
    dynamic_size: bool = False  # onnx: any input height and width
    trust_code: bool = False  # rebuild a python:<module>:<factory> student (runs that module)
    tokenizer: str = ""
    alignment_images: int = 0

    def validate(self) -> ExportConfig:
        if not self.checkpoint:
            raise ValueError("name the checkpoint: tipsdistill-export CHECKPOINT (or checkpoint=DIR)")
        for key, value, ok in (
            ("weights", self.weights, ("", "auto", "student", "ema")),
            ("format", self.format, ("student", "embedded-teacher", "onnx")),
        ):
            if value not in ok:
                raise ValueError(
                    f"export config {key}={value!r} is invalid; choose one of {[v for v in ok if v]}"
                )
        if self.image_size < 0:
            raise ValueError(f"image_size={self.image_size} must be >= 0 (0 = the run's data.image_size)")
        if self.alignment_images < 0:
            raise ValueError(f"alignment_images={self.alignment_images} must be >= 0 (0 = skip)")
        return self


CONFIG_NAME = "export_config.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tipsdistill-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "positional",
        nargs="*",
        metavar="CHECKPOINT | KEY=VALUE",
        help="a checkpoint directory (.../checkpoints/step_XXXXXXXX) or a run directory (config key checkpoint), "
        "and dotted config overrides (YAML values), applied last: weights=ema",
    )
    p.add_argument("--config", default=None, help="YAML file of ExportConfig keys (an export_config.yaml)")
    p.add_argument("--out", default=None, help="export directory (default: <run>/export_step_XXXXXXXX)")
    p.add_argument(
        "--push-to-hub", default=None, metavar="REPO_ID", help="upload the export to this Hub repo"
    )
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--token", default=None, help="Hugging Face token (default: the logged-in one)")
    p.add_argument(
        "--weights",
        choices=("auto", "student", "ema"),
        default=None,
        help="the student or its full EMA copy (default: the run's checkpoint.export)",
    )
    p.add_argument(
        "--format",
        choices=("student", "embedded-teacher", "onnx"),
        default="student",
        help="student: safetensors + timm config + model card; embedded-teacher: a teachers.embedded folder; "
        "onnx: the student files plus model.onnx (dense text-space features and global embeddings, checked "
        "with onnxruntime); CHECKPOINT may then also be a student export directory",
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="onnx: the input side the graph is traced at (default: the run's data.image_size)",
    )
    p.add_argument(
        "--dynamic-size", action="store_true", help="onnx: any input height and width (default: fixed size)"
    )
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="rebuild a python:<module>:<factory> student (imports and runs the module its config names)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="embedded-teacher: the SentencePiece tokenizer.model it carries (default: the text tower's own, "
        "else the shipped teacher's)",
    )
    p.add_argument(
        "--alignment-images",
        type=int,
        default=0,
        help="embedded-teacher: measure its alignment curve on this many synthetic validation images "
        "(alignment.json / .png; 500 for the shipped teacher) and copy the run's log.jsonl.gz; 0 = skip",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    token = parser.parse_intermixed_args(argv).token  # never part of the saved config
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # consolidation runs on the CPU
    from tipsdistill.cache.config_layer import given_flags, load_typed, save_config
    from tipsdistill.distill.export import export_checkpoint

    try:
        given = given_flags(parser, argv)
        positional = given.pop("positional", [])
        overrides = [a for a in positional if "=" in a]
        paths = [a for a in positional if "=" not in a]
        if len(paths) > 1:
            raise ValueError(f"one checkpoint at a time, got {paths}")
        flags = {k: v for k, v in given.items() if k not in ("config", "token")}
        if paths:
            flags["checkpoint"] = paths[0]
        args = load_typed(ExportConfig, given.get("config"), flags, overrides)
        out = export_checkpoint(
            args.checkpoint,
            args.out or None,
            push_to_hub_repo=args.push_to_hub or None,
            private=args.private or None,
            token=token,
            weights=args.weights or None,
            format=args.format,
            tokenizer=args.tokenizer or None,
            onnx_size=args.image_size or None,
            onnx_dynamic_size=args.dynamic_size,
            trust_code=args.trust_code,
        )
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"tipsdistill-export: {e}", file=sys.stderr)
        return 2
    save_config(args, out / CONFIG_NAME, command="tipsdistill-export")
    conf = json.loads((out / "config.json").read_text())
    if args.format == "embedded-teacher":
        summary: dict = {"export": str(out), "metrics": conf["metrics"], "text": conf["text"]}
        if args.alignment_images > 0:
            from tipsdistill.distill.embedded import teacher_alignment
            from tipsdistill.distill.export import copy_run_log

            copy_run_log(args.checkpoint, out)
            rec = teacher_alignment(out, val_size=args.alignment_images, image_size=conf["image_size"])
            summary["alignment"] = {
                readout: [round(r["miou_objects"], 1) for r in rows]
                for readout, rows in rec["curves"].items()
            }
        print(json.dumps(summary, indent=2))
        return 0
    print(
        json.dumps(
            {
                "export": str(out),
                "metrics": conf["metrics"],
                "architecture": conf.get("architecture") or conf.get("architecture_info"),
                **({"onnx": conf["onnx"]} if "onnx" in conf else {}),
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
