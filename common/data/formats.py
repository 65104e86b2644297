"""Dataset formats: find (image, mask, prompts) items on disk and read pixels.

Every other part of fedvlsm sees a dataset only through ``load_items`` and
the ``read_image`` / ``read_mask`` readers here, so a site can bring its data
in either of two layouts without code changes.

(a) Folder format::

    root/images/<name>.<ext>     any supported image format
    root/masks/<stem>.<ext>      matched to the image by file stem (any
                                 supported extension) unless given explicitly
    root/prompts.json            {"<image file name>": "prompt" | [p0, p1, ...]}
      or root/prompts.csv        columns ``image,prompt`` and optional ``mask``;
                                 one row per prompt, rows of an image in order
    root/splits.json (optional)  {"train": [image names], "val": [...], "test": [...]}

   In the folder format the k-th prompt given for an image (list position or
   CSV row order) is prompt ``p_k``; a JSON list element may itself be a list
   of variants of that prompt. Without ``splits.json`` an image goes to a
   split by a stable hash of its file name: ``h = int(sha256(name)[:8], 16) /
   2**32``; ``h < 0.8`` -> train, ``h < 0.9`` -> val, else test. The split
   does not depend on the machine, the Python hash seed or the other files.

(b) medvlsm format (the annotation files of github naamiinepal/medvlsm)::

    root/anns/{train,val,test}.json   a JSON list of records
    root/images/, root/masks/         (usual location of the files)

   A record names its image with ``img_name`` (or ``image``) and its mask with
   ``mask_name`` (or ``mask``); paths are tried relative to the dataset root,
   then to ``images/`` (``masks/`` for masks); absolute paths are used as is.
   Prompts ``p0``..``p9`` are read from the record's ``prompts`` object (the
   medvlsm layout) or from top-level ``p0``.. keys; each is a string ("" =
   absent) or a list of string variants. The item id is ``segment_id`` when
   present, else the image file stem.

Readers: PNG, JPEG, BMP and TIFF through PIL; NIfTI (``.nii``, ``.nii.gz``)
and DICOM (``.dcm``) 2D through MONAI's ``LoadImage`` (needs ``nibabel`` /
``pydicom``). Arrays are taken as stored (first axis = image rows; DICOM is
read with ``swap_ij=False`` so rows stay rows), images and masks the same way,
so they stay aligned; a PIL-read file with an EXIF Orientation tag (photos from
cameras and phones) is first turned as its tag says, as viewers and annotation
tools show it, masks too. Images come out as RGB uint8 ``(H, W, 3)`` (grayscale
replicated, alpha dropped, 16-bit and float data rescaled min-max); masks as
a 2D array of the stored values (colour masks: max over the colour channels;
transparent pixels of a mask with varying alpha are background, see ``read_mask``),
binarised by ``binarize_mask``.

Problems found while indexing are collected as ``Problem`` records so that
``check_dataset`` can report all of them at once; ``load_items`` raises a
``DataError`` listing them.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageOps

PIL_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_EXTS = (".nii", ".nii.gz")
DICOM_EXTS = (".dcm",)
SUPPORTED_EXTS = PIL_EXTS + NIFTI_EXTS + DICOM_EXTS
LOSSY_EXTS = (".jpg", ".jpeg")
STANDARD_SPLITS = ("train", "val", "test")
HASH_SPLIT_BOUNDS = (0.8, 0.9)  # train below 0.8, val below 0.9, test above
# A mask whose maximum is below this has levels {0, 1} (JPEG noise included: a lossless mask
# with values 2..31 is refused by the data check); see binarize_mask.
LOW_LEVEL_MAX = 32

Prompt = str | list[str]


class DataError(ValueError):
    """A dataset cannot be used as given; the message names the file(s) and why."""


@dataclass(frozen=True)
class Item:
    """One segmentation example: index k of ``prompts`` is prompt p_k ("" = absent)."""

    id: str
    image: Path
    mask: Path
    prompts: list[Prompt] = field(default_factory=list)


# Kinds that are reported but do not make a dataset unusable (training and
# ``ensure_valid`` go on): images nobody asked for are worth knowing about,
# but a valid dataset with spare files must still train.
WARNING_KINDS = frozenset({"unused-images"})


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: the file it is in, a short kind, and why.

    ``split`` is the split it was found in (None: not tied to one); ``count``
    is how many files one problem stands for (``unused-images`` reports many
    files at once).
    """

    path: Path
    kind: str
    message: str
    split: str | None = None
    count: int = 1

    @property
    def is_warning(self) -> bool:
        return self.kind in WARNING_KINDS

    def __str__(self) -> str:
        tag = " (warning)" if self.is_warning else ""
        return f"{self.kind}{tag}: {self.message}"  # the message names the file


# --------------------------------------------------------------------------
# Reading pixels
# --------------------------------------------------------------------------


def file_ext(path: str | Path) -> str:
    """Lower-case extension, treating ``.nii.gz`` as one extension (``Path.suffix`` otherwise).

    String operations, not Path objects: the data fingerprint calls this for
    every file of a site at every message.
    """
    name = os.path.basename(os.fspath(path)).lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    ext = os.path.splitext(name)[1]
    return "" if ext == "." else ext


def file_stem(path: str | Path) -> str:
    """File name without its (possibly double, ``.nii.gz``) extension."""
    name = Path(path).name
    ext = file_ext(name)
    return name[: len(name) - len(ext)] if ext else name


def is_supported(path: str | Path) -> bool:
    return file_ext(path) in SUPPORTED_EXTS


@functools.lru_cache(maxsize=None)
def _monai_loader(kind: str) -> Any:
    """One MONAI ``LoadImage`` per reader kind (building one per file is slow)."""
    from monai.transforms import LoadImage

    # LoadImage also builds MONAI's fallback readers, one of which warns that
    # an optional GPU DICOM decoder is missing: not relevant here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "nifti":
            from monai.data import NibabelReader

            reader = NibabelReader()
        else:
            from monai.data import PydicomReader

            # swap_ij=False keeps DICOM rows as array rows, as PIL does for PNG.
            reader = PydicomReader(swap_ij=False)
        return LoadImage(image_only=True, reader=reader, dtype=None)


def _read_monai(path: Path, kind: str) -> np.ndarray:
    try:
        loader = _monai_loader(kind)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        lib = "nibabel" if kind == "nifti" else "pydicom"
        raise DataError(f"{path}: reading {kind} files needs the '{lib}' package ({exc})") from exc
    with warnings.catch_warnings():
        # pydicom files without orientation tags warn about the affine; a 2D
        # slice does not need one.
        warnings.simplefilter("ignore")
        data = loader(str(path))
    arr = np.asarray(data.detach().cpu().numpy() if hasattr(data, "detach") else data)
    # A NIfTI array's third axis is slices (a volume of 3 would pass as RGB, and a mask's
    # slices would be merged by the max over "channels"); a DICOM's colour is its last axis.
    return _squeeze_to_2d(arr, path, colour=kind != "nifti")


def _squeeze_to_2d(arr: np.ndarray, path: Path, colour: bool = True) -> np.ndarray:
    """Drop singleton axes; keep a trailing colour axis of 3 or 4 where the format has one."""
    arr = np.squeeze(arr)
    if arr.ndim == 2 or (colour and arr.ndim == 3 and arr.shape[-1] in (3, 4)):
        return arr
    hint = "" if colour or arr.ndim != 3 else f" (a volume of {arr.shape[-1]} slices: give one 2D slice per file)"
    raise DataError(f"{path}: expected a 2D image, got an array of shape {tuple(arr.shape)}{hint}")


def _read_pil(path: Path) -> np.ndarray:
    """(H, W) or (H, W, 3|4), never squeezed: a 1-pixel-high RGB image must not pass as (W, 3) gray."""
    with Image.open(path) as img:
        img.load()
        # Pixels as viewers and annotation tools (labelme, CVAT, Label Studio) show them: a JPEG from a
        # camera or phone may store them sideways with an EXIF Orientation tag, and its mask was drawn on
        # the turned picture. A file without the tag is unchanged.
        img = ImageOps.exif_transpose(img)
        if img.mode in ("P", "PA"):
            img = img.convert("RGBA" if "transparency" in img.info or img.mode == "PA" else "RGB")
        elif img.mode == "1":
            img = img.convert("L")
        elif img.mode in ("LA", "La"):  # gray + alpha as RGBA: images drop the alpha, masks read it (read_mask)
            img = img.convert("RGBA")
        elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            img = img.convert("RGB")
        arr = np.asarray(img)
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4)):
        return arr
    raise DataError(f"{path}: unsupported image layout (PIL mode '{img.mode}', array shape {tuple(arr.shape)})")


def read_array(path: str | Path) -> np.ndarray:
    """Stored pixel values of a 2D image: ``(H, W)`` or ``(H, W, C)``, native dtype.

    Raises ``DataError`` naming the file when it is missing, of an unsupported
    type or cannot be decoded.
    """
    path = Path(path)
    ext = file_ext(path)
    if ext not in SUPPORTED_EXTS:
        raise DataError(f"{path}: unsupported file type '{ext}' (supported: {', '.join(SUPPORTED_EXTS)})")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if ext in NIFTI_EXTS:
            return _read_monai(path, "nifti")
        if ext in DICOM_EXTS:
            return _read_monai(path, "dicom")
        return _read_pil(path)
    except DataError:
        raise
    except Exception as exc:  # decoders raise many types; name the file once
        raise DataError(f"{path}: cannot decode ({type(exc).__name__}: {exc})") from exc


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """8-bit data unchanged; booleans to {0, 255}; anything else min-max to 0..255."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    a = arr.astype(np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    a = np.nan_to_num((a - lo) / (hi - lo), nan=0.0)
    return np.round(a * 255.0).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)``: grayscale replicated, alpha dropped, rescaled if not 8-bit."""
    arr = read_array(path)
    if arr.ndim == 3:
        arr = arr[..., :3]
        return np.ascontiguousarray(to_uint8(arr))
    gray = to_uint8(arr)
    return np.repeat(gray[..., None], 3, axis=2)


def read_mask(path: str | Path) -> np.ndarray:
    """The stored mask values as a 2D array (colour masks: max over colour channels).

    A colour mask whose alpha varies marks its background by transparency:
    a transparent pixel (alpha below half its range) is background whatever
    its colour (white on a transparent background read as all foreground),
    and a mask drawn in alpha alone (black everywhere) is its alpha.
    """
    arr = read_array(path)
    if arr.ndim == 3:
        colour = arr[..., :3].max(axis=2)
        if arr.shape[-1] == 4 and arr[..., 3].min() != arr[..., 3].max():
            alpha = arr[..., 3]
            half = np.iinfo(alpha.dtype).max / 2 if np.issubdtype(alpha.dtype, np.integer) else 0.5
            opaque = alpha > half
            colour = np.where(opaque, colour, 0).astype(colour.dtype) if colour[opaque].any() else alpha
        arr = colour
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    return arr


def binarize_mask(raw: np.ndarray) -> np.ndarray:
    """Foreground as uint8 {0, 1}.

    Masks are binary with levels {0, 1}, {0, 255} or {0, 65535}
    (``check_dataset`` enforces this for lossless files). Rule: if the
    maximum is below ``LOW_LEVEL_MAX`` (a {0, 1} mask), any nonzero value is
    foreground; otherwise values above 127 are. On clean masks both readings
    agree with "nonzero = foreground"; the 127 threshold also reads lossy
    JPEG {0, 255} masks (as shipped with Kvasir-SEG) correctly instead of
    growing them by their compression noise, and the first rule reads a
    JPEG {0, 1} mask, whose noise reaches 2 or 3, as its own foreground
    (a ">1 means {0, 255}" rule read it as empty).
    """
    raw = np.asarray(raw)
    if raw.size == 0:
        return raw.astype(np.uint8)
    threshold = 0 if float(raw.max()) < LOW_LEVEL_MAX else 127
    return (raw > threshold).astype(np.uint8)


# --------------------------------------------------------------------------
# Prompt values
# --------------------------------------------------------------------------


def prompt_error(value: Any) -> str | None:
    """Why ``value`` is not a valid prompt (a string or a non-empty list of strings)."""
    if isinstance(value, str):
        return None
    if isinstance(value, list):
        if not value:
            return "an empty list of variants"
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            return f"a list with non-string variant {bad[0]!r}"
        return None
    return f"of type {type(value).__name__} ({value!r}); expected a string or a list of strings"


def prompt_is_empty(prompt: Prompt) -> bool:
    if isinstance(prompt, str):
        return not prompt.strip()
    return all(not v.strip() for v in prompt)


def has_prompt(item: Item) -> bool:
    return any(not prompt_is_empty(p) for p in item.prompts)


# --------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------


def detect_format(root: str | Path) -> str:
    """``"medvlsm"`` or ``"folder"``; raises ``DataError`` saying what was expected."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: dataset folder not found")
    anns = root / "anns"
    if anns.is_dir() and any(anns.glob("*.json")):
        return "medvlsm"
    if (root / "prompts.json").is_file() or (root / "prompts.csv").is_file():
        return "folder"
    raise DataError(
        f"{root}: not a dataset: expected anns/{{train,val,test}}.json (medvlsm format) "
        "or images/, masks/ and prompts.json or prompts.csv (folder format)"
    )


def available_splits(root: str | Path) -> list[str]:
    """train, val, test, then any other split the dataset declares (anns/*.json or splits.json keys)."""
    root = Path(root)
    extra: list[str] = []
    if detect_format(root) == "medvlsm":
        extra = sorted(file_stem(p) for p in (root / "anns").glob("*.json"))
    elif (root / "splits.json").is_file():
        try:
            data = json.loads((root / "splits.json").read_text(encoding="utf-8-sig"))
        except (OSError, ValueError):
            data = {}  # reported by scan_split
        extra = list(data) if isinstance(data, dict) else []
    return list(STANDARD_SPLITS) + [s for s in extra if s not in STANDARD_SPLITS]


# --------------------------------------------------------------------------
# Scanning (collects problems; load_items raises)
# --------------------------------------------------------------------------


def scan_split(root: str | Path, split: str) -> tuple[list[Item], list[Problem]]:
    """Items of one split and every problem found indexing it (files not decoded)."""
    root = Path(root)
    try:
        fmt = detect_format(root)
    except DataError as exc:
        return [], [Problem(root, "unknown-format", str(exc))]
    if fmt == "medvlsm":
        items, problems = _scan_medvlsm(root, split)
    else:
        items, problems = _scan_folder(root, split)
    problems += _item_problems(items)
    if not items and not problems:
        where = _split_source(root, fmt, split)
        problems.append(Problem(where, "empty-split", f"{where}: split '{split}' has no items"))
    return items, problems


def _split_source(root: Path, fmt: str, split: str) -> Path:
    """The file that defines a split (what an empty-split message should name)."""
    if fmt == "medvlsm":
        return root / "anns" / f"{split}.json"
    splits_file = root / "splits.json"
    return splits_file if splits_file.is_file() else root / "images"


def load_items(root: str | Path, split: str) -> list[Item]:
    """The items of ``split`` ("train", "val", "test", ...) of the dataset at ``root``.

    Detects the format (see the module docstring). Raises ``DataError``
    listing every indexing problem: malformed annotation or prompts files,
    missing images or masks, items without a non-empty prompt, duplicate
    ids, an empty split. Pixel-level checks are ``check.check_dataset``'s.
    """
    items, problems = scan_split(root, split)
    if problems:
        raise DataError(format_problems(problems, f"{root} (split '{split}')"))
    return items


def format_problems(problems: Iterable[Problem], where: str) -> str:
    problems = list(problems)
    lines = [f"{len(problems)} problem(s) in {where}:"] + [f"  {p}" for p in problems]
    return "\n".join(lines)


def _item_problems(items: list[Item]) -> list[Problem]:
    problems = []
    seen: dict[str, Item] = {}
    for item in items:
        if not has_prompt(item):
            problems.append(Problem(item.image, "no-prompt", f"{item.image}: item '{item.id}' has no non-empty prompt"))
        if item.id in seen:
            problems.append(
                Problem(item.image, "duplicate-id", f"{item.image}: id '{item.id}' also used by {seen[item.id].image}")
            )
        else:
            seen[item.id] = item
    return problems


# ---- medvlsm --------------------------------------------------------------

_PROMPT_KEY = re.compile(r"^p(\d+)$")
IMAGE_KEYS = ("img_name", "image")
MASK_KEYS = ("mask_name", "mask")


def _scan_medvlsm(root: Path, split: str) -> tuple[list[Item], list[Problem]]:
    ann = root / "anns" / f"{split}.json"
    if not ann.is_file():
        return [], [Problem(ann, "missing-split", f"{ann}: annotation file for split '{split}' not found")]
    try:
        records = json.loads(ann.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as exc:
        return [], [Problem(ann, "malformed-annotation", f"{ann}: cannot read ({exc})")]
    except json.JSONDecodeError as exc:
        return [], [Problem(ann, "malformed-annotation", f"{ann}: invalid JSON at line {exc.lineno}: {exc.msg}")]
    if not isinstance(records, list):
        return [], [Problem(ann, "malformed-annotation", f"{ann}: expected a JSON list of records, got {type(records).__name__}")]
    items, problems = [], []
    for index, record in enumerate(records):
        item, record_problems = _medvlsm_record(root, ann, index, record)
        problems += record_problems
        if item is not None:
            items.append(item)
    return items, problems


def _first_key(record: dict, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if key in record:
            return record[key]
    return None


def _medvlsm_record(root: Path, ann: Path, index: int, record: Any) -> tuple[Item | None, list[Problem]]:
    where = f"{ann} record {index}"
    if not isinstance(record, dict):
        return None, [Problem(ann, "malformed-annotation", f"{where}: expected an object, got {type(record).__name__}")]
    problems: list[Problem] = []
    paths: dict[str, Path | None] = {}
    for what, keys, folder in (("image", IMAGE_KEYS, "images"), ("mask", MASK_KEYS, "masks")):
        name = _first_key(record, keys)
        if not isinstance(name, str) or not name:
            problems.append(
                Problem(ann, "malformed-annotation", f"{where}: missing {what} file name (key {' or '.join(keys)})")
            )
            paths[what] = None
            continue
        path, tried = _resolve(root, name, folder)
        if path is None:
            problems.append(
                Problem(
                    ann,
                    f"missing-{what}",
                    f"{where} ({keys[0]}={name!r}): {what} file not found; tried {', '.join(map(str, tried))}",
                )
            )
        paths[what] = path
    prompts, prompt_problems = _medvlsm_prompts(ann, where, record)
    problems += prompt_problems
    if paths["image"] is None or paths["mask"] is None or prompt_problems:
        return None, problems
    raw_id = record.get("segment_id")
    item_id = str(raw_id) if raw_id not in (None, "") else file_stem(paths["image"])
    return Item(item_id, paths["image"], paths["mask"], prompts), problems


def _resolve(root: Path, name: str, folder: str) -> tuple[Path | None, list[Path]]:
    given = Path(name)
    candidates = [given] if given.is_absolute() else [root / given, root / folder / given]
    for candidate in candidates:
        if candidate.is_file():
            return candidate, candidates
    return None, candidates


def _medvlsm_prompts(ann: Path, where: str, record: dict) -> tuple[list[Prompt], list[Problem]]:
    source = record.get("prompts", record)
    if not isinstance(source, dict):
        return [], [Problem(ann, "malformed-annotation", f"{where}: 'prompts' must be an object of p0..p9, got {type(source).__name__}")]
    numbered = {}
    problems = []
    for key, value in source.items():
        match = _PROMPT_KEY.match(str(key))
        if not match:
            continue
        err = prompt_error(value)
        if err:
            problems.append(Problem(ann, "malformed-annotation", f"{where}: prompt '{key}' is {err}"))
        else:
            numbered[int(match.group(1))] = value
    if not numbered and not problems:
        problems.append(Problem(ann, "malformed-annotation", f"{where}: no prompts (expected keys p0..p9)"))
    if problems:
        return [], problems
    return [numbered.get(k, "") for k in range(max(numbered) + 1)], []


# ---- folder ---------------------------------------------------------------


def _scan_folder(root: Path, split: str) -> tuple[list[Item], list[Problem]]:
    problems: list[Problem] = []
    images_dir = root / "images"
    if not images_dir.is_dir():
        return [], [Problem(images_dir, "missing-image", f"{images_dir}: images folder not found")]
    images = {p.name: p for p in sorted(images_dir.iterdir()) if p.is_file() and is_supported(p)}
    prompts, explicit_masks, prompt_problems = _folder_prompts(root)
    problems += prompt_problems
    if prompts is None:  # the prompts file itself is unusable: one problem, not one per image
        return [], problems
    names, split_problems = _folder_split_names(root, split, images)
    problems += split_problems
    masks_by_stem = _masks_by_stem(root / "masks")
    items = []
    for name in names:
        image = images[name]
        mask, mask_problem = _folder_mask(root, image, explicit_masks.get(name), masks_by_stem)
        if mask_problem:
            problems.append(mask_problem)
        if name not in prompts:
            problems.append(Problem(image, "no-prompt", f"{image}: no entry in the prompts file"))
            continue
        item_prompts = prompts[name]
        if mask is not None and item_prompts is not None:  # None: malformed entry, reported
            items.append(Item(file_stem(name), image, mask, item_prompts))
    for name in sorted(set(prompts) - set(images)):
        source = "prompts.json" if (root / "prompts.json").is_file() else "prompts.csv"
        problems.append(
            Problem(root / source, "missing-image", f"{root / source}: entry for {name!r} but {images_dir / name} not found")
        )
    return items, problems


def _masks_by_stem(masks_dir: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    if masks_dir.is_dir():
        for p in sorted(masks_dir.iterdir()):
            if p.is_file() and is_supported(p):
                found.setdefault(file_stem(p), []).append(p)
    return found


def _folder_mask(
    root: Path, image: Path, explicit: str | None, masks_by_stem: dict[str, list[Path]]
) -> tuple[Path | None, Problem | None]:
    if explicit:
        path, tried = _resolve(root, explicit, "masks")
        if path is None:
            return None, Problem(image, "missing-mask", f"{image}: mask {explicit!r} not found; tried {', '.join(map(str, tried))}")
        return path, None
    candidates = masks_by_stem.get(file_stem(image), [])
    if not candidates:
        return None, Problem(image, "missing-mask", f"{image}: no mask named {file_stem(image)}.* in {root / 'masks'}")
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        return None, Problem(image, "missing-mask", f"{image}: several masks match its stem ({names}); name one in the prompts file")
    return candidates[0], None


def _folder_prompts(root: Path) -> tuple[dict[str, list[Prompt] | None] | None, dict[str, str], list[Problem]]:
    """Prompts per image name (None for a malformed entry; the whole dict None when the file is unusable)."""
    json_path, csv_path = root / "prompts.json", root / "prompts.csv"
    if json_path.is_file():
        prompts, problems = _prompts_json(json_path)
        return prompts, {}, problems
    return _prompts_csv(csv_path)


def _prompts_json(path: Path) -> tuple[dict[str, list[Prompt] | None] | None, list[Problem]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        return None, [Problem(path, "malformed-prompts", f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}")]
    except (OSError, UnicodeDecodeError) as exc:
        return None, [Problem(path, "malformed-prompts", f"{path}: cannot read ({exc})")]
    if not isinstance(data, dict):
        return None, [Problem(path, "malformed-prompts", f"{path}: expected an object mapping image name -> prompt(s), got {type(data).__name__}")]
    prompts: dict[str, list[Prompt] | None] = {}
    problems = []
    for name, value in data.items():
        values = value if isinstance(value, list) else [value]
        errors = [e for e in (prompt_error(v) for v in values) if e]
        if errors or not values:
            why = errors[0] if errors else "an empty list"
            problems.append(Problem(path, "malformed-prompts", f"{path}: entry {name!r}: prompt is {why}"))
            prompts[name] = None
            continue
        prompts[name] = list(values)
    return prompts, problems


def _prompts_csv(path: Path) -> tuple[dict[str, list[Prompt] | None] | None, dict[str, str], list[Problem]]:
    prompts: dict[str, list[Prompt] | None] = {}
    masks: dict[str, str] = {}
    problems: list[Problem] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            missing = [c for c in ("image", "prompt") if c not in header]
            if missing:
                msg = f"{path}: missing column(s) {', '.join(missing)} (header: {', '.join(header) or 'none'})"
                return None, {}, [Problem(path, "malformed-prompts", msg)]
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return None, {}, [Problem(path, "malformed-prompts", f"{path}: cannot read ({exc})")]
    bad: set[str] = set()
    for line, row in rows:
        error = _csv_row_error(row, masks)
        image = (row.get("image") or "").strip()
        if error:
            problems.append(Problem(path, "malformed-prompts", f"{path} line {line}: {error}"))
            if image:
                bad.add(image)
            continue
        prompts.setdefault(image, []).append(row.get("prompt") or "")  # type: ignore[union-attr]
        mask = (row.get("mask") or "").strip()
        if mask:
            masks[image] = mask
    for image in bad:
        prompts[image] = None
    return prompts, masks, problems


def _csv_row_error(row: dict, masks: dict[str, str]) -> str | None:
    image = (row.get("image") or "").strip()
    if not image:
        return "empty 'image' field"
    if None in row:  # csv puts surplus fields under the key None
        return f"more fields than the header has columns (image {image!r})"
    mask = (row.get("mask") or "").strip()
    if mask and image in masks and masks[image] != mask:
        return f"mask {mask!r} for {image!r} conflicts with {masks[image]!r} given on an earlier row"
    return None


def hash_split(name: str) -> str:
    """Deterministic 80/10/10 split of an image file name (see module docstring)."""
    h = int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16) / 2**32
    if h < HASH_SPLIT_BOUNDS[0]:
        return "train"
    if h < HASH_SPLIT_BOUNDS[1]:
        return "val"
    return "test"


def _folder_split_names(root: Path, split: str, images: dict[str, Path]) -> tuple[list[str], list[Problem]]:
    splits_file = root / "splits.json"
    if not splits_file.is_file():
        return [n for n in images if hash_split(n) == split], []
    try:
        data = json.loads(splits_file.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        return [], [Problem(splits_file, "malformed-prompts", f"{splits_file}: invalid JSON at line {exc.lineno}: {exc.msg}")]
    except (OSError, UnicodeDecodeError) as exc:
        return [], [Problem(splits_file, "malformed-prompts", f"{splits_file}: cannot read ({exc})")]
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        return [], [Problem(splits_file, "malformed-prompts", f"{splits_file}: expected {{split: [image names]}}")]
    if split not in data:
        return [], [Problem(splits_file, "missing-split", f"{splits_file}: no split '{split}'")]
    by_stem = {file_stem(n): n for n in images}
    names, problems = [], []
    for entry in data[split]:
        name = entry if isinstance(entry, str) and entry in images else by_stem.get(str(entry))
        if name is None:
            problems.append(
                Problem(splits_file, "missing-image", f"{splits_file}: split '{split}' lists {entry!r} but no such image in {root / 'images'}")
            )
        else:
            names.append(name)
    return names, problems
