"""Damage done to files on disk, for the tests of what lopfast refuses to load."""
import struct
import zipfile


def tensor_record(path):
    """(name, offset, size) of the largest tensor record of a torch zip file: where its bytes start."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename and not i.filename.endswith(".pkl")),
                   key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.filename, info.header_offset + 30 + name_len + extra_len, info.file_size


def invert_bytes(path, n=64):
    """Invert ``n`` bytes in the middle of the largest tensor record (the zip stays readable)."""
    name, start, size = tensor_record(path)
    assert size >= n, (name, size)
    at = start + (size - n) // 2
    with open(path, "r+b") as f:
        f.seek(at)
        data = f.read(n)
        f.seek(at)
        f.write(bytes(255 - b for b in data))
    return name


def truncate(path, keep=0.5):
    """Cut the file to ``keep`` of its length."""
    with open(path, "r+b") as f:
        f.truncate(int(len(f.read()) * keep))
