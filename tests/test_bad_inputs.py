"""Unusual and broken inputs: each decodes correctly, is skipped and reported, or is a clear error."""
import numpy as np
import pytest
import torch
from PIL import Image

from coft_fast.data import DataError, from_csv, from_folder, iterate_batches, read_class_names
from coft_fast.data.loading import decode_rgb


def to_tensor(image):
    assert image.mode == "RGB"
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def decoded(path):
    return np.asarray(decode_rgb(str(path)))


def test_grayscale_palette_cmyk_decode_to_the_same_rgb(tmp_path):
    gray = np.full((6, 7), 90, np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    assert (decoded(tmp_path / "gray.png") == 90).all()

    palette = Image.new("P", (5, 5))
    palette.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    palette.save(tmp_path / "palette.png")
    assert (decoded(tmp_path / "palette.png") == [10, 20, 30]).all()

    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # pure red in CMYK
    red = decoded(tmp_path / "cmyk.jpg").astype(int)
    assert red.shape == (8, 8, 3) and (red[..., 0] > 200).all() and (red[..., 1:] < 60).all()


@pytest.mark.parametrize("mode, name", [("I;16", "deep.png"), ("I", "deep.tif")])
def test_16_bit_images_are_scaled_not_clipped(tmp_path, mode, name):
    values = np.linspace(0, 65535, 64 * 4).reshape(4, 64).astype(np.uint16)
    image = Image.fromarray(values) if mode == "I;16" else Image.fromarray(values.astype(np.int32), "I")
    image.save(tmp_path / name)
    assert Image.open(tmp_path / name).mode == mode
    result = decoded(tmp_path / name)[..., 0].astype(int)
    expected = np.round(values / 257.0).astype(int)
    assert np.abs(result - expected).max() <= 1
    assert result.min() == 0 and result.max() == 255 and len(np.unique(result)) > 200


def test_float_images_in_zero_to_one_are_scaled(tmp_path):
    values = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(values, "F").save(tmp_path / "float.tif")
    result = decoded(tmp_path / "float.tif")[..., 0]
    assert result[0, 0] == 0 and result[-1, -1] == 255


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    result = decoded(tmp_path / "rgba.png")
    assert (result[:2] == [200, 0, 0]).all() and (result[2:] == 255).all()

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    palette.info["transparency"] = 1
    palette.save(tmp_path / "palette_t.png", transparency=1)
    assert (decoded(tmp_path / "palette_t.png") == 255).all()


def test_large_image_within_the_bomb_limit_decodes(tmp_path):
    Image.new("RGB", (4000, 3000), (1, 2, 3)).save(tmp_path / "large.png")
    assert decode_rgb(str(tmp_path / "large.png")).size == (4000, 3000)


def test_decompression_bomb_is_skipped_and_reported(tmp_path, monkeypatch):
    root = tmp_path / "pool"
    (root / "cat").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(root / "cat" / "bomb.png")
    Image.new("RGB", (4, 4)).save(root / "cat" / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is over twice the limit
    source = from_folder(root)
    batches = list(iterate_batches(source, lambda im: to_tensor(im.resize((4, 4))), batch_size=4))
    assert sum(len(b.indices) for b in batches) == 1
    assert [s["path"].rsplit("/", 1)[-1] for s in source.skipped] == ["bomb.png"]
    assert "DecompressionBomb" in source.skipped[0]["reason"]


def test_truncated_jpeg_and_zero_byte_files_are_skipped(tmp_path):
    root = tmp_path / "pool"
    (root / "dog").mkdir(parents=True)
    Image.new("RGB", (32, 32), (9, 9, 9)).save(root / "dog" / "whole.jpg", quality=95)
    data = (root / "dog" / "whole.jpg").read_bytes()
    (root / "dog" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "dog" / "zero.jpg").write_bytes(b"")
    (root / "dog" / "text.png").write_text("not an image at all")
    source = from_folder(root)
    batches = list(iterate_batches(source, to_tensor, batch_size=8))
    assert sum(len(b.indices) for b in batches) == 1
    assert sorted(s["path"].rsplit("/", 1)[-1] for s in source.skipped) == ["text.png", "truncated.jpg", "zero.jpg"]


def test_unicode_and_spaces_in_paths(tmp_path):
    root = tmp_path / "données d'essai"
    (root / "chat noir").mkdir(parents=True)
    Image.new("RGB", (4, 4), (1, 1, 1)).save(root / "chat noir" / "photo n°1 ✓.png")
    source = from_folder(root, ["chat noir", "chien"])
    batches = list(iterate_batches(source, to_tensor, batch_size=2))
    assert len(batches[0].indices) == 1 and not source.skipped


def test_csv_repeated_rows_are_ignored_and_conflicts_are_errors(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b.png")
    (tmp_path / "list.csv").write_text("path,label\na.png,cat\nb.png,\n./a.png,cat\nb.png,dog\n")
    source = from_csv(tmp_path / "list.csv", ["cat", "dog"])
    assert len(source) == 2 and source.labels == [0, 1]  # a label fills in an unlabelled repeat
    (tmp_path / "conflict.csv").write_text("a.png,cat\na.png,dog\n")
    with pytest.raises(DataError, match=r"conflict\.csv, rows 1 and 2"):
        from_csv(tmp_path / "conflict.csv", ["cat", "dog"])


def test_csv_label_naming_an_unknown_class_is_an_error(tmp_path):
    (tmp_path / "list.csv").write_text("a.png,cat\nb.png,zebra\n")
    with pytest.raises(DataError, match=r"row 2: label 'zebra'"):
        from_csv(tmp_path / "list.csv", ["cat", "dog"])


def test_class_files_blank_lines_duplicates_and_unusual_names(tmp_path):
    (tmp_path / "classes.txt").write_text("\n  red-eyed tree frog \n\nCrème brûlée\nAT&T logo (old)\n\n", encoding="utf-8")
    assert read_class_names(tmp_path / "classes.txt") == ["red-eyed tree frog", "Crème brûlée", "AT&T logo (old)"]
    (tmp_path / "twice.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(DataError, match=r"twice\.txt: class name 'cat' appears twice"):
        read_class_names(tmp_path / "twice.txt")
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(DataError, match="no class names"):
        read_class_names(tmp_path / "blank.txt")
