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
