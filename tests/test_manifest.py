"""JSONL manifests (viva_base/data/manifest.py): what a user's file can hold, and the one-line errors it gets."""
import pytest

from viva_base.data.manifest import ManifestError, check_manifest, read_jsonl, read_manifest
from viva_base.errors import UserError

LINE = b'{"id": "a", "source": "a.mp4", "target": "b.mp4", "instruction": "make it red"}'


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "b.mp4").write_bytes(b"")
    return tmp_path


def test_windows_line_ends_a_byte_order_mark_and_blank_lines_are_read(folder):
    """What an editor on Windows writes: a UTF-8 byte-order mark, CRLF line ends, a blank line; line numbers count
    every line."""
    path = folder / "m.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + LINE + b"\r\n\r\n" + LINE.replace(b'"a"', b'"c"') + b"\r\n")
    assert [(n, r["id"]) for n, r in read_jsonl(path)] == [(1, "a"), (3, "c")]
    records = read_manifest(path, "pairs")
    assert [r["source"] for r in records] == [str(folder.resolve() / "a.mp4")] * 2


def test_a_file_that_is_not_text_names_its_line(folder):
    """It was a UnicodeDecodeError traceback."""
    path = folder / "m.jsonl"
    path.write_bytes(LINE + b"\n" + bytes(range(128, 256)) + b"\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl:2: not UTF-8 text"):
        read_manifest(path)


def test_a_folder_or_an_unreadable_file_is_one_line(folder):
    with pytest.raises(ManifestError, match="cannot be read"):
        read_jsonl(folder)  # read_manifest itself says "not found" first: it wants a file
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(folder)


@pytest.mark.parametrize("content, words", [
    (LINE + b"\n" + LINE, ":2: duplicate id 'a'"),
    (LINE.replace(b'"target": "b.mp4", ', b""), ":1: missing target"),
    (LINE.replace(b"b.mp4", b"nope.mp4"), ":1: target file"),
    (b"[1, 2]", ":1: each line must be a JSON object"),
    (b"\n\n", "holds no records"),
])
def test_check_manifest_names_the_recipe_key_the_file_and_the_line(folder, content, words):
    path = folder / "m.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        check_manifest("data.manifest", path, "pairs")
    message = str(info.value)
    assert message.startswith("data.manifest: ") and words in message and "m.jsonl" in message, message
    assert "\n" not in message


def test_clips_of_another_aspect_ratio_are_named_before_training(tmp_path, caplog):
    """Every clip is resized to data.size whole; a portrait clip in a landscape recipe is learned squashed. The trainers
    now say so once, with the count and the worst clip (a warning: squashing may be intended)."""
    import torch

    from viva_base.data.pairs import PairDataset, warn_changed_aspect
    from viva_base.video import write_video

    records = []
    for i, (h, w) in enumerate([(16, 32), (17, 32), (32, 16)]):  # landscape, within 10%, portrait
        path = write_video(tmp_path / f"c{i}.mkv", torch.rand(5, 3, h, w), fps=8)
        records.append({"id": f"p{i}", "source": str(path), "target": str(path), "instruction": "x"})
    dataset = PairDataset(records, frames=5, size=(16, 32))
    assert dataset.shapes == [(16, 32), (17, 32), (32, 16)] and dataset.num_frames == [5, 5, 5]
    with caplog.at_level("WARNING", logger="viva_base.data.pairs"):
        assert warn_changed_aspect(records, dataset.shapes, (16, 32), "training pairs") == 1
    assert "1 of the 3 training pairs are resized to data.size=16x32" in caplog.text
    assert "p2, 32x16, by 4.00x" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="viva_base.data.pairs"):
        assert warn_changed_aspect(records[:2], dataset.shapes[:2], (16, 32), "training pairs") == 0
        assert warn_changed_aspect(records, dataset.shapes, None, "training pairs") == 0
    assert caplog.text == ""
