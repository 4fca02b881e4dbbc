"""Prompt templates and class-name / synonym files for zero-shot segmentation.

``TCL_TEMPLATES`` are the 9 templates the official TIPS zero-shot notebook uses (the TCL paper's
subset of the ImageNet prompts), in the notebook's order. ``OPENAI_IMAGENET_TEMPLATES`` are the 80
prompts of the CLIP ImageNet zero-shot notebook.
"""

from __future__ import annotations

from pathlib import Path

# Subset of ImageNet prompts used in the TCL paper, then the two TCL additions (official notebook order).
TCL_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of a {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "a photo of many {}.",
    "a photo of {}s.",
)

OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "tcl": TCL_TEMPLATES,
    "openai": OPENAI_IMAGENET_TEMPLATES,
    "none": ("{}",),
}


def get_templates(spec: str | list[str] | tuple[str, ...] | None = "tcl") -> tuple[str, ...]:
    """Resolve a template set: a name (``tcl`` default, ``openai`` 80 prompts, ``none`` = bare name),
    a path to a text file (one template per line, each containing ``{}``), or a list of templates."""
    if spec is None:
        spec = "tcl"
    if isinstance(spec, str):
        if spec in TEMPLATE_SETS:
            return TEMPLATE_SETS[spec]
        path = Path(spec)
        if not path.is_file():
            raise ValueError(
                f"unknown template set {spec!r}: not one of {sorted(TEMPLATE_SETS)} and not an existing file "
                "(a template file has one template per line, each with a '{}' for the class name)"
            )
        templates = [
            ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")
        ]
        where = f"template file {path}"
    else:
        templates = list(spec)
        where = "template list"
    if not templates:
        raise ValueError(f"{where} is empty")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(
            f"{where}: every template needs exactly one '{{}}' for the class name; bad: {bad[:3]}"
        )
    return tuple(templates)


def load_class_names(path: str | Path) -> list[list[str]]:
    """Read a class-name file: one class per line (line order = label id), synonyms separated by commas.

    ``person, people, human`` gives class ``person`` scored as the max over the three names. Blank
    lines are an error (they would shift every later label id); lines starting with ``#`` are comments.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"class-name file {path} does not exist")
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    classes: list[list[str]] = []
    for lineno, raw in enumerate(lines, 1):
        if raw.startswith("#"):
            continue
        names = [n.strip() for n in raw.split(",") if n.strip()]
        if not names:
            raise ValueError(
                f"{path}:{lineno} is blank; a class file has one class per line in label-id order "
                "(remove the blank line or write the class name)"
            )
        classes.append(names)
    if not classes:
        raise ValueError(f"class-name file {path} lists no classes")
    return classes


def normalise_class_list(classes: list[str] | list[list[str]] | tuple) -> list[list[str]]:
    """Accept ``["cat", "dog"]`` or ``[["cat", "kitty"], ["dog"]]``; return the list-of-synonyms form."""
    out: list[list[str]] = []
    for i, c in enumerate(classes):
        names = [c] if isinstance(c, str) else list(c)
        names = [str(n).strip() for n in names if str(n).strip()]
        if not names:
            raise ValueError(f"class {i} has an empty name")
        out.append(names)
    return out


def apply_synonyms(
    classes: list[list[str]], synonyms: list[list[str]] | str | Path | None
) -> list[list[str]]:
    """Merge a synonym file/list (same line order as the class list) into the class list."""
    if synonyms is None:
        return classes
    syn = load_class_names(synonyms) if isinstance(synonyms, (str, Path)) else normalise_class_list(synonyms)
    if len(syn) != len(classes):
        raise ValueError(
            f"synonym list has {len(syn)} lines but the dataset has {len(classes)} classes; "
            "write one line per class, in label-id order"
        )
    merged = []
    for base, extra in zip(classes, syn):
        merged.append(list(dict.fromkeys(base + extra)))
    return merged
