"""The one image pipeline: items -> batches of model input on the device + per-item errors.

Every consumer turns images into tensors here: ``grmpiqa score`` (local and Ray engines,
through :class:`~grmpiqa.scoring.engine.BatchScorer`), ``model.score``, the service,
evaluation, the stage-2 feature cache and validation, the baselines and quality maps.

Items: paths, encoded bytes (``(data, name)`` pairs), PIL images, and sources that read
themselves (:class:`EncodedSource`, e.g. :class:`~grmpiqa.scoring.inputs.ImageSource`:
files, tar members). Per item, where the image is decoded (a DataLoader worker, a
thread, or this process), the eval geometry of :class:`~grmpiqa.transforms.PreprocessConfig`
runs in 8 bits: the whole image resized to ``resize`` x ``resize``, the centre ``crop``.
Only those uint8 crops (150 kB at 224 px, a quarter of float32) cross processes; on CUDA
they are pinned and copied without blocking; normalisation runs on the target device
(:meth:`~grmpiqa.transforms.PreprocessConfig.normalize`).

Decoders (``decode``, ``grmpiqa score --decode``):

* ``"pil"`` - Pillow (:mod:`grmpiqa.images`: formats allowed by content, EXIF
  orientation, grayscale, palette, alpha, CMYK, 16-bit, truncated files as errors, the
  pixel limit from the header, large JPEGs at a reduced DCT scale). The exact
  reference: equal bit for bit to the eval transform on the decoded image.
* ``"torch"`` - content that sniffs as a complete 8-bit 3-channel JPEG within the pixel
  limit (checked from its header, before decoding) is decoded by torchvision
  (``decode_jpeg``: nvJPEG on CUDA, batched, in this process; libjpeg-turbo on the CPU,
  where the image is read), oriented by its EXIF tag, resized (antialiased, rounded to 8
  bits as Pillow does) and cropped as a tensor on that device. Everything else (other
  formats, grayscale or CMYK JPEGs, truncated files, whatever the torch decoder refuses)
  falls back, per item, to the ``"pil"`` decoder with its guarantees. Scores differ from
  the reference by the two decoders' and resizers' rounding (docs/gpu.md).
* ``"auto"`` - ``"torch"`` on CUDA, ``"pil"`` elsewhere.

On CUDA the device stage of batch k+1 (the copy, nvJPEG, resize, normalisation) runs in a
background thread on its own CUDA stream while the model runs batch k on the default
stream (as timm's ``PrefetchLoader``).
"""

from __future__ import annotations

import io
import os
import queue
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from grmpiqa.errors import GrmpiqaError, ImageError
from grmpiqa.images import (
    DEFAULT_MAX_PIXELS,
    check_encoded_size,
    check_regular_file,
    load_image,
    split_by_budget,
    to_rgb,
)
from grmpiqa.transforms import PreprocessConfig

__all__ = [
    "DECODERS",
    "DeviceBatch",
    "EncodedSource",
    "ImageLoader",
    "Prepared",
    "default_workers",
    "eval_input",
    "load_pixels",
    "model_input",
    "orient",
    "pixels_from_image",
    "pixels_from_tensor",
    "prepare_item",
    "resolve_decode",
    "resolve_device",
]

#: Decoder choices (``--decode``); ``auto`` resolves to one of the other two.
DECODERS: tuple[str, ...] = ("auto", "pil", "torch")
#: Decoded bytes (width x height x 3) a device decode may hold at once (split into groups).
DEVICE_DECODE_BUDGET = 2 << 30
_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_EXIF_ORIENTATION = 0x0112
_INTERP = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec (one warning per
# call); grmpiqa uses decode_jpeg knowingly (supported range: torchvision 0.16 - 0.29)
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io\.image")


# -- device and decoder choice ------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA if present, else MPS where torch has it, else the CPU; any other
    value is checked to exist here (:class:`GrmpiqaError` otherwise)."""
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise GrmpiqaError(f"device {device!r}: {err}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise GrmpiqaError(f"device {device}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise GrmpiqaError(
                f"device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise GrmpiqaError(f"device {device}: MPS is not available on this machine")
    return dev


def describe_device(device: torch.device | str) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H200)``: what announcements and metadata record."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(dev)


def resolve_decode(decode: str, device: torch.device | str) -> str:
    """``"pil"`` or ``"torch"``: ``auto`` is ``torch`` on CUDA (nvJPEG), ``pil`` elsewhere."""
    if decode not in DECODERS:
        raise GrmpiqaError(f"unknown decoder {decode!r}; use one of {', '.join(DECODERS)}")
    if decode != "auto":
        return decode
    return "torch" if torch.device(device).type == "cuda" else "pil"


def default_workers(device: torch.device | str) -> int:
    """DataLoader workers of ``grmpiqa score``: CPUs - 1, at most 16 on CUDA (the model
    does not need the cores) and 4 on the CPU (the model does)."""
    cpus = os.cpu_count() or 1
    cap = 16 if torch.device(device).type == "cuda" else 4
    return max(0, min(cap, cpus - 1))


# -- items ----------------------------------------------------------------------------------


@runtime_checkable
class EncodedSource(Protocol):
    """An item that reads its own bytes (a file, a tar member): errors name ``label``."""

    @property
    def label(self) -> str: ...

    def read_bytes(self, max_pixels: int) -> bytes:
        """The encoded image (:class:`ImageError` when unreadable or too large)."""
        ...

    def decode(
        self, max_pixels: int, min_side: int | None, max_decoded_bytes: int | None
    ) -> Image.Image:
        """The image decoded by Pillow into RGB (:mod:`grmpiqa.images`)."""
        ...


def read_file(path: str, label: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The bytes of a regular file, or :class:`ImageError` naming ``label`` (also for a
    file larger than any image within ``max_pixels`` could be, before reading it:
    :func:`grmpiqa.images.check_encoded_size`)."""
    check_encoded_size(check_regular_file(path, label), max_pixels, label)
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as err:
        raise ImageError(f"{label}: cannot read file ({err.strerror or err})") from None


# -- the per-image steps -------------------------------------------------------------------


def pixels_from_image(img: Image.Image, preprocess: PreprocessConfig) -> torch.Tensor:
    """The reference geometry (Pillow resize, centre crop) of an RGB image as uint8
    ``[3, crop, crop]``: :meth:`PreprocessConfig.normalize` of it equals the eval
    transform of ``img`` bit for bit."""
    arr = np.array(preprocess.resize_crop(img), dtype=np.uint8)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def orient(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to ``[C, H, W]`` pixels, as Pillow's
    ``ImageOps.exif_transpose`` does; other values leave the image as it is."""
    if orientation == 2:  # mirror horizontally
        return img.flip(-1)
    if orientation == 3:  # rotate 180
        return img.flip(-1).flip(-2)
    if orientation == 4:  # mirror vertically
        return img.flip(-2)
    if orientation == 5:  # transpose
        return img.transpose(-1, -2)
    if orientation == 6:  # rotate 270 (clockwise 90)
        return img.transpose(-1, -2).flip(-1)
    if orientation == 7:  # transverse
        return img.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:  # rotate 90 (counter-clockwise)
        return img.transpose(-1, -2).flip(-2)
    return img


def pixels_from_tensor(
    img: torch.Tensor, preprocess: PreprocessConfig, orientation: int = 1
) -> torch.Tensor:
    """The eval geometry of decoded uint8 pixels ``[3, H, W]`` on their own device:
    orientation, antialiased resize to ``resize`` x ``resize`` in float32, rounded and
    clipped to 8 bits (as Pillow's result is), centre crop; uint8 ``[3, crop, crop]``."""
    x = orient(img, orientation)
    mode = _INTERP[preprocess.interpolation]
    size = (preprocess.resize, preprocess.resize)
    x = x.unsqueeze(0).to(torch.float32)
    if mode == "nearest":
        x = F.interpolate(x, size=size, mode=mode)
    else:
        x = F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)
    off = (preprocess.resize - preprocess.crop) // 2
    x = x[0, :, off : off + preprocess.crop, off : off + preprocess.crop]
    return x.round_().clamp_(0, 255).to(torch.uint8).contiguous()


@dataclass
class Encoded:
    """A JPEG handed to the device decoder: its bytes (uint8 ``[n]``), EXIF orientation,
    decoded size (for the memory budget) and the name errors use."""

    data: torch.Tensor
    orientation: int
    pixels: int
    label: str


def probe_jpeg(
    data: bytes, max_pixels: int, max_decoded_bytes: int | None = None
) -> tuple[int, int] | None:
    """``(orientation, width * height)`` when ``data`` is a JPEG the torch decoders take
    (content sniffed as JPEG, 8-bit, 3 components, complete up to its end-of-image
    marker, within ``max_pixels`` and ``max_decoded_bytes``); None sends it to Pillow
    (which refuses what is over a limit, with the reason). Reads the header only."""
    if not data.startswith(_JPEG_SOI) or not data.endswith(_JPEG_EOI):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
                w, h = img.size
                if (
                    img.format != "JPEG"
                    or img.mode != "RGB"
                    or getattr(img, "bits", 8) != 8
                    or not 0 < w * h <= max_pixels
                    or (max_decoded_bytes is not None and 3 * w * h > max_decoded_bytes)
                ):
                    return None
                orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, EOFError):
        return None
    return (orientation if 1 <= orientation <= 8 else 1), w * h


def decode_jpegs(datas: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's JPEG decoder on ``device`` (nvJPEG on CUDA, one batched call where
    torchvision has it); raises what it raises (the caller falls back per item)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if device.type == "cuda":
        try:
            out = decode_jpeg(list(datas), mode=ImageReadMode.UNCHANGED, device=device)
        except TypeError:  # torchvision < 0.19: no batched CUDA decode
            out = [decode_jpeg(d, mode=ImageReadMode.UNCHANGED, device=device) for d in datas]
        return list(out)  # type: ignore[arg-type]
    return [decode_jpeg(d, mode=ImageReadMode.UNCHANGED) for d in datas]


#: What preparing one item gives: ``(uint8 pixels [3, crop, crop] | Encoded | None, error)``.
Prepared = tuple[torch.Tensor | Encoded | None, str | None]


@dataclass(frozen=True)
class ItemPlan:
    """What happens to one item where it is read (picklable, for DataLoader workers).

    ``decode``: ``"pil"`` or ``"torch"`` (resolved); ``device_decode``: JPEGs go to the
    device decoder as bytes (the CUDA path; forced on the CPU by tests) instead of being
    decoded here; ``min_side``: the reduced-DCT-scale bound of the Pillow decoder;
    ``max_decoded_bytes``: an image whose decoded size (from its header) is larger is
    refused before decoding (the per-batch budget of :mod:`grmpiqa.scoring.engine`).
    """

    preprocess: PreprocessConfig
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int | None = None
    decode: str = "pil"
    device_decode: bool = False
    max_decoded_bytes: int | None = None

    def prepare(self, item: Any) -> Prepared:
        """Prepare one item; an unreadable one gives ``(None, message)``."""
        try:
            return self._prepare(item), None
        except ImageError as err:
            return None, str(err)

    def _prepare(self, item: Any) -> torch.Tensor | Encoded:
        if isinstance(item, Image.Image):
            return pixels_from_image(to_rgb(item), self.preprocess)
        data: bytes | None = None
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], bytes | bytearray):
            data, label = bytes(item[0]), str(item[1])
        elif isinstance(item, bytes | bytearray):
            data, label = bytes(item), "<image bytes>"
        elif isinstance(item, str | os.PathLike):
            label = os.fspath(item)
            if self.decode == "pil":
                check_regular_file(label, label)
                return self._pil(self._load(label, label))
            data = read_file(label, label, self.max_pixels)
        elif isinstance(item, EncodedSource):
            label = item.label
            if self.decode == "pil":
                return self._pil(
                    item.decode(self.max_pixels, self.min_side, self.max_decoded_bytes)
                )
            data = item.read_bytes(self.max_pixels)
        else:
            raise ImageError(f"cannot score an object of type {type(item).__name__}")
        if self.decode == "torch":
            probe = probe_jpeg(data, self.max_pixels, self.max_decoded_bytes)
            if probe is not None:
                encoded = Encoded(
                    torch.frombuffer(bytearray(data), dtype=torch.uint8), *probe, label
                )
                if self.device_decode:
                    return encoded
                (done,) = decode_on(
                    [encoded], torch.device("cpu"), self.preprocess, self.max_pixels
                )
                if isinstance(done, str):
                    raise ImageError(done)
                return done
        return self._from_bytes(data, label)

    def _from_bytes(self, data: bytes, label: str) -> torch.Tensor:
        return self._pil(self._load(data, label))

    def _load(self, source: str | bytes, label: str) -> Image.Image:
        return load_image(
            source,
            self.max_pixels,
            name=label,
            min_side=self.min_side,
            max_decoded_bytes=self.max_decoded_bytes,
        )

    def _pil(self, img: Image.Image) -> torch.Tensor:
        return pixels_from_image(img, self.preprocess)


def prepare_item(item: Any, plan: ItemPlan) -> Prepared:
    """:meth:`ItemPlan.prepare` as a function."""
    return plan.prepare(item)


def decode_on(
    encoded: Sequence[Encoded],
    device: torch.device,
    preprocess: PreprocessConfig,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    budget: int = DEVICE_DECODE_BUDGET,
) -> list[torch.Tensor | str]:
    """Decode JPEGs on ``device`` and apply the eval geometry there: one uint8
    ``[3, crop, crop]`` per item on ``device``, or its error message.

    Batched in groups of at most ``budget`` decoded bytes; a group the decoder refuses
    is decoded item by item, and an item it refuses falls back to Pillow on the host
    (an error row only if Pillow refuses it too).
    """
    out: list[torch.Tensor | str] = [""] * len(encoded)
    for group in split_by_budget([3 * e.pixels for e in encoded], budget):
        try:
            decoded = decode_jpegs([encoded[i].data for i in group], device)
        except RuntimeError:
            decoded = []
        if len(decoded) != len(group):  # the batch failed: item by item
            decoded = []
            for i in group:
                try:
                    decoded.append(decode_jpegs([encoded[i].data], device)[0])
                except RuntimeError:
                    decoded.append(torch.empty(0, dtype=torch.uint8))
        for i, img in zip(group, decoded, strict=True):
            e = encoded[i]
            if img.ndim == 3 and img.shape[0] == 3:
                out[i] = pixels_from_tensor(img, preprocess, e.orientation)
                continue
            try:  # the torch decoder refused it: Pillow on the host decides
                img_pil = load_image(e.data.numpy().tobytes(), max_pixels, name=e.label)
                out[i] = pixels_from_image(img_pil, preprocess).to(device)
            except ImageError as err:
                out[i] = str(err)
    return out


# -- batches --------------------------------------------------------------------------------


@dataclass
class HostBatch:
    """One batch as the workers hand it over: uint8 crops of the items prepared on the
    host, JPEG bytes for the device decoder, and the errors."""

    pixel_indices: list[int]
    pixels: torch.Tensor | None
    encoded: list[tuple[int, Encoded]]
    errors: list[tuple[int, str]]

    def pin_memory(self) -> HostBatch:
        """Pin the crops only (DataLoader ``pin_memory``); bytes go to nvJPEG as they are."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


@dataclass
class DeviceBatch:
    """The model input of the readable items of one batch, and the errors of the others.

    ``pixels``: float32 ``[len(indices), 3, crop, crop]`` on the device, normalised,
    rows in the order of ``indices`` (ascending item indices); ``errors``: ``(item
    index, message)``.
    """

    indices: list[int]
    pixels: torch.Tensor
    errors: list[tuple[int, str]]
    _event: Any = field(default=None, repr=False)


class _ItemDataset(Dataset[tuple[int, Prepared]]):
    def __init__(self, items: Sequence[Any], plan: ItemPlan) -> None:
        self.items = items
        self.plan = plan

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[int, Prepared]:
        return i, self.plan.prepare(self.items[i])


def collate(batch: Sequence[tuple[int, Prepared]]) -> HostBatch:
    """Group prepared items into a :class:`HostBatch` (crops stacked)."""
    pix = [(i, t) for i, (t, _) in batch if isinstance(t, torch.Tensor)]
    enc = [(i, t) for i, (t, _) in batch if isinstance(t, Encoded)]
    bad = [(i, e) for i, (t, e) in batch if t is None and e is not None]
    stacked = torch.stack([t for _, t in pix]) if pix else None
    return HostBatch([i for i, _ in pix], stacked, enc, bad)


def to_device(
    batch: HostBatch,
    device: torch.device,
    preprocess: PreprocessConfig,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    budget: int = DEVICE_DECODE_BUDGET,
) -> DeviceBatch:
    """The device stage: crops copied (non-blocking from pinned memory), JPEG bytes
    decoded on the device (:func:`decode_on`, at most ``budget`` decoded bytes at once),
    everything normalised on the device."""
    errors = sorted(batch.errors)
    idx = batch.pixel_indices
    if not batch.encoded and batch.pixels is not None and idx == sorted(idx):
        on = batch.pixels.to(device, non_blocking=True)  # in order already: no re-stacking
        return DeviceBatch(list(idx), preprocess.normalize(on), errors)
    rows: dict[int, torch.Tensor] = {}
    if batch.pixels is not None:
        on = batch.pixels.to(device, non_blocking=True)
        rows.update(zip(batch.pixel_indices, on.unbind(0), strict=True))
    if batch.encoded:
        done = decode_on([e for _, e in batch.encoded], device, preprocess, max_pixels, budget)
        for (i, _), res in zip(batch.encoded, done, strict=True):
            if isinstance(res, str):
                errors.append((i, res))
            else:
                rows[i] = res
    indices = sorted(rows)
    crop = preprocess.crop
    if indices:
        pixels = preprocess.normalize(torch.stack([rows[i] for i in indices]))
    else:
        pixels = torch.empty(0, 3, crop, crop, device=device)
    return DeviceBatch(indices, pixels, sorted(errors))


def _as_batches(n: int, batches: Sequence[Sequence[int]] | int) -> list[list[int]]:
    if isinstance(batches, int):
        if isinstance(batches, bool) or batches < 1:
            raise GrmpiqaError(f"batch size must be at least 1, got {batches}")
        return [list(range(s, min(s + batches, n))) for s in range(0, n, batches)]
    return [list(b) for b in batches]


class ImageLoader:
    """Items -> :class:`DeviceBatch` es, in order: the one loader.

    Args:
        items: paths, ``(bytes, name)``, PIL images or :class:`EncodedSource` items.
        preprocess: the model's preprocessing.
        device: where the batches go (normalised there).
        batches: a batch size, or explicit lists of item indices (a batch per list).
        num_workers: DataLoader worker processes reading and decoding (0: in-process).
        decode: ``"auto"``, ``"pil"`` or ``"torch"`` (see the module).
        max_pixels: larger images are refused from their header, before decoding.
        max_decoded_bytes: the decoded-pixel budget (bytes, bit depth counted): a larger
            image is refused from its header; the device decoder holds at most this much
            decoded at once (default :data:`DEVICE_DECODE_BUDGET` there).
        reduced_decode: let the Pillow decoder decode large JPEGs at a reduced DCT scale
            down to the resize target (``PreprocessConfig.decode_min_side``).
        prefetch: run the device stage of the next batch in a background thread (on its
            own CUDA stream) while the caller works on this one; default: on CUDA.
        device_decode: hand JPEGs to the device stage as bytes (default: on CUDA with
            the torch decoder); True on the CPU runs the CUDA path's code there (tests).
        progress: a tqdm bar of images.
    """

    def __init__(
        self,
        items: Sequence[Any],
        preprocess: PreprocessConfig,
        device: torch.device | str = "cpu",
        batches: Sequence[Sequence[int]] | int = 32,
        *,
        num_workers: int = 0,
        decode: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_decoded_bytes: int | None = None,
        reduced_decode: bool = True,
        prefetch: bool | None = None,
        device_decode: bool | None = None,
        progress: bool = False,
    ) -> None:
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise GrmpiqaError(
                f"number of DataLoader workers must be 0 (decode in-process) or more, "
                f"got {num_workers}"
            )
        self.items = items
        self.preprocess = preprocess
        self.device = torch.device(device)
        self.batches = _as_batches(len(items), batches)
        self.num_workers = num_workers
        self.decode = resolve_decode(decode, self.device)
        cuda = self.device.type == "cuda"
        if device_decode is None:
            device_decode = cuda and self.decode == "torch"
        self.plan = ItemPlan(
            preprocess,
            max_pixels,
            preprocess.decode_min_side if reduced_decode else None,
            self.decode,
            bool(device_decode) and self.decode == "torch",
            max_decoded_bytes,
        )
        self.prefetch = cuda if prefetch is None else prefetch
        self.progress = progress

    def __len__(self) -> int:
        return len(self.batches)

    def host_batches(self) -> Iterator[HostBatch]:
        """The batches as the workers prepare them (before the device stage)."""
        loader = DataLoader(
            _ItemDataset(self.items, self.plan),
            batch_sampler=self.batches,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )
        yield from loader

    def _stage(self, batch: HostBatch) -> DeviceBatch:
        budget = self.plan.max_decoded_bytes or DEVICE_DECODE_BUDGET
        return to_device(batch, self.device, self.preprocess, self.plan.max_pixels, budget)

    def __iter__(self) -> Iterator[DeviceBatch]:
        total = sum(len(b) for b in self.batches)
        bar = tqdm(total=total, unit="img", disable=not self.progress, dynamic_ncols=True)
        source = (
            _prefetched(self.host_batches, self._stage, self.device)
            if self.prefetch
            else (self._stage(b) for b in self.host_batches())
        )
        try:
            for b in source:
                if b._event is not None:  # made on the side stream: wait for it here
                    torch.cuda.current_stream(self.device).wait_event(b._event)
                    b.pixels.record_stream(torch.cuda.current_stream(self.device))
                bar.update(len(b.indices) + len(b.errors))
                yield b
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
            bar.close()


_DONE = object()


def _prefetched(
    batches: Callable[[], Iterator[HostBatch]],
    stage: Callable[[HostBatch], DeviceBatch],
    device: torch.device,
    depth: int = 2,
) -> Iterator[DeviceBatch]:
    """Run ``stage`` over ``batches()`` in a background thread, ``depth`` batches ahead;
    on CUDA on a side stream, each batch carrying the event the consumer waits for."""
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(obj: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        cuda = device.type == "cuda"
        stream = torch.cuda.Stream(device) if cuda else None
        it = batches()
        try:
            for hb in it:
                if stop.is_set():
                    break
                if stream is not None:
                    with torch.cuda.device(device), torch.cuda.stream(stream):
                        db = stage(hb)
                        db._event = torch.cuda.Event()
                        db._event.record(stream)
                else:
                    db = stage(hb)
                if not put(db):
                    break
            put(_DONE)
        except BaseException as err:  # handed to the consumer, raised there
            put(err)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, name="grmpiqa-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            obj = q.get()
            if obj is _DONE:
                break
            if isinstance(obj, BaseException):
                raise obj
            yield obj
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def eval_input(img: Image.Image, preprocess: PreprocessConfig) -> torch.Tensor:
    """The model input ``[3, crop, crop]`` of one decoded RGB image, on the CPU (equal
    bit for bit to ``preprocess.eval_transform()(img)``)."""
    return preprocess.normalize(pixels_from_image(img, preprocess))


def model_input(
    images: Sequence[Image.Image],
    preprocess: PreprocessConfig,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The model input ``[N, 3, crop, crop]`` of decoded RGB images in memory (training
    shots, validation images), normalised on ``device``."""
    if not images:
        return torch.empty(0, 3, preprocess.crop, preprocess.crop, device=torch.device(device))
    pixels = torch.stack([pixels_from_image(to_rgb(im), preprocess) for im in images])
    return preprocess.normalize(pixels.to(device))


def load_pixels(
    items: Sequence[Any],
    preprocess: PreprocessConfig,
    device: torch.device | str = "cpu",
    *,
    decode: str = "pil",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    reduced_decode: bool = False,
    batch_size: int = 64,
) -> torch.Tensor:
    """The model input ``[N, 3, crop, crop]`` of every item, in this process (for the
    few images of training, validation and maps); the first unreadable item raises
    :class:`ImageError`. PIL images in memory take the reference path."""
    loader = ImageLoader(
        items,
        preprocess,
        device,
        max(1, batch_size),
        decode=decode,
        max_pixels=max_pixels,
        reduced_decode=reduced_decode,
        prefetch=False,
    )
    parts = []
    for b in loader:
        if b.errors:
            raise ImageError(b.errors[0][1])
        parts.append(b.pixels)
    if not parts:
        crop = preprocess.crop
        return torch.empty(0, 3, crop, crop, device=torch.device(device))
    return torch.cat(parts)
