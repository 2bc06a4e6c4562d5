"""Training images: the IMAGE batch, photos read as ComfyUI's LoadImage reads them, and their buckets."""

from __future__ import annotations

import os

import torch

import folder_paths

from ..dti_core.buckets import choose_bucket

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class TrainingImage:
    """One training photo at its own size: RGB (H, W, 3) in [0, 1], an optional subject mask
    (H, W) (1 = subject: the loss counts there), and where it came from (for error messages)."""

    def __init__(self, pixels: torch.Tensor, mask: torch.Tensor | None, source: str):
        self.pixels, self.mask, self.source = pixels, mask, source


def _rgb(images: torch.Tensor, what: str) -> torch.Tensor:
    channels = images.shape[-1]
    if channels == 1:
        images = images.expand(-1, -1, -1, 3)
    elif channels == 4:
        images = images[..., :3]
    elif channels != 3:
        raise ValueError(f"{what} must have 1, 3 or 4 channels, got {channels}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{what} contains NaN or infinite pixel values")
    return images.float().clamp(0.0, 1.0)


def _check_mask(mask: torch.Tensor, source: str) -> torch.Tensor:
    if not bool(torch.isfinite(mask).all()):
        raise ValueError(f"the mask of {source} contains NaN or infinite values")
    mask = mask.float().clamp(0.0, 1.0)
    if float(mask.max()) <= 0.0:
        raise ValueError(f"the mask of {source} is empty (all 0): the mask marks the subject with 1 (white). "
                         "LoadImage's MASK is 1 where the PNG is transparent, so for a cut-out subject on a "
                         "transparent background put an InvertMask node between them")
    return mask


def load_training_images(images: torch.Tensor | None, mask: torch.Tensor | None = None,
                         folder: str = "") -> list[TrainingImage]:
    """The IMAGE batch (with the optional MASK: one for all images or one per image, resized to the
    images if its size differs) and every image of ``folder`` (a folder under ComfyUI's input
    directory, files by name, each at its own size; PNG alpha is its subject mask)."""
    items = []
    if mask is not None and images is None:
        raise ValueError("mask belongs to the images batch, which is not connected (the photos of image_folder "
                         "take their mask from their transparency)")
    if images is not None:
        if not torch.is_tensor(images) or images.dim() != 4:
            raise ValueError(f"images must be an IMAGE batch (B, H, W, C); got {getattr(images, 'shape', type(images))}")
        if images.shape[0] > 0:
            px = _rgb(images, "the image batch")
            masks = None
            if mask is not None:
                m = mask if mask.dim() == 3 else mask.view(1, *mask.shape[-2:])
                if m.shape[0] not in (1, px.shape[0]):
                    raise ValueError(f"mask: {m.shape[0]} masks for {px.shape[0]} images; give one mask for all "
                                     "images or one per image")
                m = m.float()
                if tuple(m.shape[-2:]) != tuple(px.shape[1:3]):
                    m = torch.nn.functional.interpolate(m[:, None], size=tuple(px.shape[1:3]), mode="bilinear",
                                                        align_corners=False)[:, 0]
                masks = m.expand(px.shape[0], -1, -1)
            for i in range(px.shape[0]):
                src = f"image {i + 1} of the batch"
                items.append(TrainingImage(px[i], None if masks is None else _check_mask(masks[i], src), src))
    if folder and folder.strip():
        items.extend(_folder_images(folder.strip()))
    if not items:
        raise ValueError("no training images (the images batch is empty or not connected, and no image_folder): "
                         "connect an IMAGE batch of the concept, or name a folder of its photos inside ComfyUI's "
                         "input folder in image_folder")
    return items


def _host_decoder():
    """The decoder ComfyUI's own LoadImage reads photos with, where it is not Pillow: 0.33's goes
    through PyAV (``InputImpl.VideoFromFile(path).get_components()``), 0.3.64's through Pillow
    (None here). Read off LoadImage itself, since both hosts ship ``VideoFromFile``."""
    import inspect

    import nodes as comfy_nodes  # ComfyUI's nodes.py (this pack's nodes/ is a subpackage)

    try:
        uses_av = "VideoFromFile" in inspect.getsource(comfy_nodes.LoadImage.load_image)
    except (OSError, TypeError):
        return None
    if not uses_av:
        return None
    from comfy_api.latest import InputImpl

    return InputImpl.VideoFromFile


def _read_pillow(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    # LoadImage's Pillow route (0.3.64's, and 0.33's for what PyAV cannot decode)
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.seek(0)
        im = ImageOps.exif_transpose(im)
        if im.mode == "I":
            im = im.point(lambda i: i * (1 / 255))
        alpha = None
        if "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info):
            alpha = torch.from_numpy(np.array(im.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0)
        rgb = torch.from_numpy(np.array(im.convert("RGB"), dtype=np.float32) / 255.0)
    return rgb, alpha


def read_image(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(rgb (H, W, 3), alpha (H, W) or None)`` float32 in [0, 1], as ComfyUI's LoadImage reads a photo
    (its decoder: EXIF orientation, 16-bit grey, first frame), so a photo trains as the user sees it
    loaded. ``alpha`` is the transparency as stored (opaque = 1), where the file has one. Where the
    host's PyAV decoder fails on a file that Pillow reads (0.33 refuses some small GIFs), Pillow reads
    it. ``ValueError`` if it cannot be read."""
    from PIL import Image

    try:
        decoder = _host_decoder()
        if decoder is not None:
            try:
                parts = decoder(path).get_components()
            except Exception:  # the host's decoder failed: its own LoadImage would try Pillow for some
                parts = None
            if parts is not None and parts.images.shape[0] > 0:
                alpha = None if parts.alpha is None else parts.alpha[0, ..., -1].float().cpu()
                return parts.images[0].float().cpu(), alpha
        return _read_pillow(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


def image_files(folder: str) -> list[str]:
    """The photos in ``folder`` (not its subfolders), sorted by name."""
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)
                  and os.path.isfile(os.path.join(folder, n)))


def _folder_images(folder: str) -> list[TrainingImage]:
    root = os.path.realpath(folder_paths.get_input_directory())
    path = os.path.realpath(os.path.join(root, folder))
    if os.path.isabs(folder) or "\0" in folder or os.path.commonpath([root, path]) != root:
        raise ValueError(f"image_folder {folder!r} must be a folder inside ComfyUI's input directory")
    if not os.path.isdir(path):
        raise ValueError(f"image_folder {folder!r}: no such folder in ComfyUI's input directory ({root})")
    names = image_files(path)
    if not names:
        raise ValueError(f"image_folder {folder!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    items = []
    for name in names:
        src = f"{folder}/{name}"
        try:
            rgb, alpha = read_image(os.path.join(path, name))
        except ValueError as e:
            raise ValueError(f"image_folder: {e}".replace(os.path.join(path, name), src)) from None
        # alpha is the subject mask as it stands (opaque = subject), unlike LoadImage's 1 - alpha
        mask = _check_mask(alpha, src) if alpha is not None else None
        items.append(TrainingImage(rgb, mask, src))
    return items


def bucket_resize(item: TrainingImage, resolution: int, multiple: int = 8):
    """``(bucket, pixels (1, h, w, 3), mask (h, w) or None)``: the image resized (antialiased
    bicubic, as the paper's pipeline) to the smallest size that covers its bucket, sides rounded down
    to ``multiple`` px (the VAE's cell); each step crops a bucket-sized window of it in latent space."""
    h, w = item.pixels.shape[:2]
    bh, bw = choose_bucket(h, w, resolution)
    scale = max(bh / h, bw / w)
    m = int(multiple)
    size = (max(bh, int(h * scale) // m * m), max(bw, int(w * scale) // m * m))
    samples = item.pixels.movedim(-1, 0)[None]
    if (h, w) != size:
        samples = torch.nn.functional.interpolate(samples, size=size, mode="bicubic", antialias=True,
                                                  align_corners=False).clamp(0.0, 1.0)
    mask = item.mask
    if mask is not None and tuple(mask.shape) != size:
        mask = torch.nn.functional.interpolate(mask[None, None], size=size, mode="bilinear", antialias=True,
                                               align_corners=False)[0, 0].clamp(0.0, 1.0)
    return (bh, bw), samples.movedim(1, -1), mask
