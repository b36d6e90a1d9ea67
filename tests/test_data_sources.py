import json

import pytest
from PIL import Image

from coft_fast.data import UNLABELLED, DataError, from_coop_split, from_csv, from_folder, iterate_batches, load_source, read_class_names


def make_image(path, color=(200, 10, 10), size=(12, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)
    return path


@pytest.fixture
def class_tree(tmp_path):
    root = tmp_path / "images"
    for name in ("cat", "dog"):
        for i in range(3):
            make_image(root / name / f"{i}.png")
    return root


def test_class_folders_give_labels(class_tree):
    source = from_folder(class_tree)
    assert source.class_names == ["cat", "dog"]
    assert len(source) == 6 and source.labels == [0, 0, 0, 1, 1, 1]
    assert source.has_labels


def test_class_folders_follow_given_order_and_match_loosely(tmp_path):
    root = tmp_path / "imgs"
    make_image(root / "Golden_Retriever" / "a.png")
    make_image(root / "tabby-cat" / "b.png")
    source = from_folder(root, ["tabby cat", "golden retriever", "horse"])
    assert source.num_classes == 3
    labels = dict(zip([p.split("/")[-2] for p in source.paths], source.labels))
    assert labels == {"Golden_Retriever": 1, "tabby-cat": 0}


def test_unknown_class_folder_is_an_error(class_tree):
    with pytest.raises(DataError, match="'dog' matches no class"):
        from_folder(class_tree, ["cat", "horse"])


def test_flat_folder_is_unlabelled_and_needs_classes(tmp_path):
    for i in range(4):
        make_image(tmp_path / f"{i}.jpg")
    source = from_folder(tmp_path, ["a", "b"])
    assert len(source) == 4 and set(source.labels) == {UNLABELLED} and not source.has_labels
    with pytest.raises(DataError, match="class names are required"):
        from_folder(tmp_path)


def test_empty_and_missing_inputs(tmp_path):
    with pytest.raises(DataError, match="no images"):
        from_folder(tmp_path, ["a"])
    with pytest.raises(DataError, match="not found"):
        from_folder(tmp_path / "nope")
    with pytest.raises(DataError, match="not found"):
        load_source(tmp_path / "nope")


def test_mixed_layout_is_an_error(class_tree):
    make_image(class_tree / "loose.png")
    with pytest.raises(DataError, match="mixes class sub-folders"):
        from_folder(class_tree)


def test_class_names_from_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat\n\n  dog  \nsea lion\n")
    assert read_class_names(path) == ["cat", "dog", "sea lion"]
    path.write_text("cat\ndog\ncat\n")
    with pytest.raises(DataError, match="'cat' appears twice"):
        read_class_names(path)
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no class names"):
        read_class_names(path)
    with pytest.raises(DataError, match="class file not found"):
        read_class_names(tmp_path / "missing.txt")


def test_csv_with_header_names_and_indices(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "c.png")
    make_image(tmp_path / "sub" / "b.png")
    (tmp_path / "list.csv").write_text("path,label\na.png,dog\nsub/b.png,0\n" + f"{tmp_path / 'c.png'},\n")
    source = from_csv(tmp_path / "list.csv", ["cat", "dog"])
    assert source.labels == [1, 0, UNLABELLED]
    assert source.paths[1] == str(tmp_path / "sub" / "b.png")


def test_csv_errors_name_the_row(tmp_path):
    (tmp_path / "bad.csv").write_text("a.png,cat\nb.png,horse\n")
    with pytest.raises(DataError, match=r"row 2: label 'horse'"):
        from_csv(tmp_path / "bad.csv", ["cat", "dog"])
    (tmp_path / "idx.csv").write_text("a.png,7\n")
    with pytest.raises(DataError, match="index 7"):
        from_csv(tmp_path / "idx.csv", ["cat", "dog"])
    (tmp_path / "empty.csv").write_text("path,label\n")
    with pytest.raises(DataError, match="no image rows"):
        from_csv(tmp_path / "empty.csv", ["cat"])
    with pytest.raises(DataError, match="needs class names"):
        load_source(tmp_path / "idx.csv")


def coop_dataset(tmp_path):
    root = tmp_path / "caltech-101"
    images = root / "101_ObjectCategories"
    entries = []
    for label, name in enumerate(["face", "sea_horse"]):
        for i in range(2):
            make_image(images / name / f"{i}.jpg")
            entries.append([f"{name}/{i}.jpg", label, name])
    split = {"train": entries[:3], "val": entries[3:], "test": entries}
    (root / "split_zhou_Caltech101.json").write_text(json.dumps(split))
    return root / "split_zhou_Caltech101.json", images


def test_coop_split_finds_the_image_folder(tmp_path):
    json_path, images = coop_dataset(tmp_path)
    source = from_coop_split(json_path, "test")
    assert source.class_names == ["face", "sea_horse"]  # CoOp's names as they are; prompts say "sea horse"
    assert source.labels == [0, 0, 1, 1]
    assert source.paths[0] == str(images / "face" / "0.jpg")
    assert len(load_source(json_path, split="train")) == 3


def test_coop_split_errors(tmp_path):
    json_path, images = coop_dataset(tmp_path)
    with pytest.raises(DataError, match="choose a split"):
        from_coop_split(json_path, None)
    with pytest.raises(DataError, match="no split 'dev'"):
        from_coop_split(json_path, "dev")
    with pytest.raises(DataError, match="label 1, but there are 1 class names"):
        from_coop_split(json_path, "test", class_names=["face"])
    with pytest.raises(DataError, match="cannot find the image folder"):
        from_coop_split(_moved(json_path, tmp_path), "test")


def _moved(json_path, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir()
    target = other / json_path.name
    target.write_text(json_path.read_text())
    return target


def test_corrupt_and_non_image_files_are_skipped_and_reported(tmp_path):
    root = tmp_path / "imgs"
    for i in range(3):
        make_image(root / "cat" / f"{i}.png")
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "cat" / "empty.png").write_bytes(b"")
    make_image(root / "cat" / "gray.png", mode="L")
    (root / "cat" / "notes.txt").write_text("not an image")
    source = from_folder(root)
    assert len(source) == 6  # the .txt file is not listed at all

    def transform(image):
        import torch

        assert image.mode == "RGB"
        return torch.zeros(3, 4, 4)

    batches = list(iterate_batches(source, transform, batch_size=4, num_workers=0))
    decoded = sum(len(b.indices) for b in batches)
    assert decoded == 4  # three RGB images and the grayscale one
    skipped = sorted(s["path"].rsplit("/", 1)[-1] for s in source.skipped)
    assert skipped == ["broken.jpg", "empty.png"]
    assert all(s["reason"] for s in source.skipped)


def test_multi_worker_loading_keeps_order(tmp_path):
    root = tmp_path / "imgs"
    for i in range(10):
        make_image(root / "a" / f"{i:02d}.png", color=(i, i, i))

    import torch

    def transform(image):
        return torch.tensor(image.getpixel((0, 0))[0])

    source = from_folder(root)
    batches = list(iterate_batches(source, transform, batch_size=3, num_workers=2))
    assert torch.cat([b.images for b in batches]).tolist() == list(range(10))
    shard = list(iterate_batches(source, transform, batch_size=3, indices=[1, 3, 5]))
    assert torch.cat([b.indices for b in shard]).tolist() == [1, 3, 5]


def test_shared_cifar_folders(cifar_root):
    source = from_folder(cifar_root / "test")
    assert source.num_classes == 10 and len(source) == 5000
    assert source.class_names[0] == "airplane"
