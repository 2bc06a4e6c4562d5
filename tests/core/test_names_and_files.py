import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dti_core import embedding_file as ef
from dti_core.embedding_file import EmbeddingFileError, dti_metadata, load_embedding, save_embedding
from dti_core.magnitude import target_norm, vocabulary_norms
from dti_core.names import UnsafeNameError, check_name, resolve_inside

HOSTILE = ["../x", "a/../../x", "/abs", "C:\\x", "..\\..\\x", "con", "aux.txt", "", "   ", "x" * 300,
           "a\x00b", "a b", "emb,x", ".hidden", "a/", "a//b", "./a", "sub/..", "trailing.",
           "a/../b", "a/./b", "a/b/../../c", "a/..", "../embeddings/x"]


def all_files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def vec(n=2, width=768, seed=0):
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused_and_nothing_is_written_outside(tmp_path, name):
    root = tmp_path / "embeddings"
    root.mkdir()
    with pytest.raises(UnsafeNameError, match="refused"):
        save_embedding(str(root), name, {"clip_l": vec()})
    assert all_files(tmp_path) == []


def test_symlinked_subfolder_pointing_outside_is_refused(tmp_path):
    root, outside = tmp_path / "embeddings", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(UnsafeNameError, match="outside the folder"):
        save_embedding(str(root), "link/x", {"clip_l": vec()})
    assert list(outside.iterdir()) == []


def test_good_names_including_subfolders(tmp_path):
    assert check_name("my-cat_v2.1") == "my-cat_v2.1"
    assert check_name("cats/tabby.safetensors") == "cats/tabby"
    path = save_embedding(str(tmp_path), "cats/tabby", {"clip_l": vec()})
    assert path == str(tmp_path / "cats" / "tabby.safetensors")
    assert resolve_inside(str(tmp_path), "cats/tabby") == path


def test_round_trip_with_metadata(tmp_path):
    meta = dti_metadata(m_star={"clip_l": 0.39, "clip_g": 0.61}, kappa=1e-4, lr=0.04, steps=400,
                        initializer="dog", seed=7, model_family="SDXL", version="0.1.0")
    vectors = {"clip_l": vec(2, 768), "clip_g": vec(2, 1280, seed=1)}
    path = save_embedding(str(tmp_path), "dog", vectors, meta)
    emb = load_embedding(path)
    assert emb.is_dti and emb.source_format == "dti"
    assert emb.m_star("clip_g") == 0.61 and emb.metadata["dti.initializer"] == "dog"
    for k in vectors:
        assert torch.equal(emb.vectors[k], vectors[k])


def test_no_overwrite_unless_asked_and_old_file_intact(tmp_path):
    path = save_embedding(str(tmp_path), "x", {"clip_l": vec(seed=1)})
    before = open(path, "rb").read()
    with pytest.raises(FileExistsError):
        save_embedding(str(tmp_path), "x", {"clip_l": vec(seed=2)})
    assert open(path, "rb").read() == before
    save_embedding(str(tmp_path), "x", {"clip_l": vec(seed=2)}, overwrite=True)
    assert torch.equal(load_embedding(path).vectors["clip_l"], vec(seed=2))


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = save_embedding(str(tmp_path), "x", {"clip_l": vec(seed=1)})
    before = open(path, "rb").read()

    def torn(f, data):
        f.write(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(ef, "_write_all", torn)
    with pytest.raises(OSError, match="disk full"):
        save_embedding(str(tmp_path), "x", {"clip_l": vec(seed=2)}, overwrite=True)
    assert open(path, "rb").read() == before
    assert all_files(tmp_path) == ["x.safetensors"]
    monkeypatch.setattr(ef, "_write_all", lambda f, d: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_embedding(str(tmp_path), "y", {"clip_l": vec()})
    assert all_files(tmp_path) == ["x.safetensors"]


def test_refuses_wrong_width_and_non_finite(tmp_path):
    with pytest.raises(EmbeddingFileError, match="768"):
        save_embedding(str(tmp_path), "x", {"clip_l": vec(1, 1280)})
    bad = vec()
    bad[0, 0] = float("nan")
    with pytest.raises(EmbeddingFileError, match="NaN"):
        save_embedding(str(tmp_path), "x", {"clip_l": bad})
    assert all_files(tmp_path) == []


def test_reads_foreign_formats(tmp_path):
    t = vec(3, 768)
    torch.save({"string_to_param": {"*": t}, "name": "x", "step": 500}, tmp_path / "a1111.pt")
    save_file({"emb_params": t}, str(tmp_path / "a1111.safetensors"))
    save_file({"clip_l": t, "clip_g": vec(3, 1280)}, str(tmp_path / "kohya.safetensors"))
    torch.save({"<cat-toy>": t[0]}, tmp_path / "diffusers.bin")
    save_file({"<cat-toy>": vec(1, 1024)}, str(tmp_path / "sd2.safetensors"))
    assert load_embedding(str(tmp_path / "a1111.pt")).source_format == "a1111"
    assert torch.equal(load_embedding(str(tmp_path / "a1111.pt")).vectors["clip_l"], t)
    assert torch.equal(load_embedding(str(tmp_path / "a1111.safetensors")).vectors["clip_l"], t)
    kohya = load_embedding(str(tmp_path / "kohya.safetensors"))
    assert set(kohya.vectors) == {"clip_l", "clip_g"} and not kohya.is_dti
    diff = load_embedding(str(tmp_path / "diffusers.bin"))
    assert diff.source_format == "diffusers" and diff.vectors["clip_l"].shape == (1, 768)
    assert set(load_embedding(str(tmp_path / "sd2.safetensors")).vectors) == {"clip_h"}


class Payload:
    def __reduce__(self):
        return (exec, ("import os; os.environ['DTI_PWNED'] = '1'",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.delenv("DTI_PWNED", raising=False)
    raw, zipped = tmp_path / "evil.pt", tmp_path / "evil_zip.bin"
    with open(raw, "wb") as f:
        pickle.dump({"string_to_param": {"*": Payload()}}, f)
    torch.save({"string_to_param": {"*": Payload()}}, zipped)
    assert "DTI_PWNED" not in os.environ  # writing them did not run them
    for path in (raw, zipped):
        with pytest.raises(EmbeddingFileError, match="refused"):
            load_embedding(str(path))
    assert "DTI_PWNED" not in os.environ


@pytest.mark.parametrize(
    "blob, problem",
    [
        (b"\x01\x02", "truncated"),
        ((10**12).to_bytes(8, "little") + b"{}", "header length"),
        ((5).to_bytes(8, "little") + b"nope!", "not valid JSON"),
        ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
        ((len(b'{"clip_l":{"dtype":"F32","shape":[1,768],"data_offsets":[0,3072]}}')).to_bytes(8, "little")
         + b'{"clip_l":{"dtype":"F32","shape":[1,768],"data_offsets":[0,3072]}}' + b"\x00" * 10, "corrupt"),
    ],
)
def test_corrupt_safetensors_give_clear_errors(tmp_path, blob, problem):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(EmbeddingFileError, match=problem) as err:
        load_embedding(str(path))
    assert "bad.safetensors" in str(err.value)


def test_check_name_never_rewrites_a_path():
    # Refuse rather than normalise: "a/../b" must not quietly become "b".
    for name in ("a/../b", "a/./b", "x/y/../z"):
        with pytest.raises(UnsafeNameError, match="refused"):
            check_name(name)
        with pytest.raises(UnsafeNameError, match="refused"):
            resolve_inside("/tmp", name)


@pytest.mark.parametrize("key, width", [("clip_l", 1280), ("clip_g", 768), ("clip_h", 768), ("clip_l", 1024)])
def test_per_encoder_key_of_the_wrong_width_is_refused_on_load(tmp_path, key, width):
    # ComfyUI picks the tensor by key name, so a wrong-width clip_l would be spliced into the wrong encoder.
    save_file({key: vec(1, width)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(EmbeddingFileError, match=f"{key}.*{width} wide.*expected {ef.ENCODER_WIDTHS[key]}"):
        load_embedding(str(tmp_path / "w.safetensors"))
    torch.save({key: vec(1, width)}, tmp_path / "w.pt")
    with pytest.raises(EmbeddingFileError, match=f"{width} wide"):
        load_embedding(str(tmp_path / "w.pt"))


def test_wrong_dtype_nan_and_unknown_width(tmp_path):
    save_file({"clip_l": torch.ones(1, 768, dtype=torch.int32)}, str(tmp_path / "int.safetensors"))
    with pytest.raises(EmbeddingFileError, match="dtype"):
        load_embedding(str(tmp_path / "int.safetensors"))
    save_file({"clip_l": torch.full((1, 768), float("nan"))}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(EmbeddingFileError, match="NaN"):
        load_embedding(str(tmp_path / "nan.safetensors"))
    save_file({"x": torch.ones(1, 500)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(EmbeddingFileError, match="500 wide"):
        load_embedding(str(tmp_path / "w.safetensors"))
    (tmp_path / "x.ckpt").write_bytes(b"x")
    with pytest.raises(EmbeddingFileError, match="unsupported extension"):
        load_embedding(str(tmp_path / "x.ckpt"))


def test_magnitude_modes():
    vocab = torch.zeros(5, 4)
    vocab[0] = torch.tensor([3.0, 4.0, 0, 0])  # norm 5
    vocab[1] = torch.tensor([0, 1.0, 0, 0])  # norm 1
    vocab[2] = torch.tensor([0, 0, 0, 3.0])  # norm 3; rows 3, 4 are zero and ignored
    assert target_norm(vocab, "mean") == pytest.approx(3.0)
    assert target_norm(vocab, "max") == pytest.approx(5.0)
    assert target_norm(vocab, "min") == pytest.approx(1.0)
    assert target_norm(None, 0.42) == 0.42
    assert vocabulary_norms(vocab).numel() == 3
    for bad in (0, -1.0, float("nan"), "median"):
        with pytest.raises(ValueError):
            target_norm(vocab, bad)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_get_normal_permissions_from_the_umask(tmp_path, umask, mode):
    """Not mkstemp's 0600: another user (a shared or containerised ComfyUI) must read the file."""
    old = os.umask(umask)
    try:
        path = save_embedding(str(tmp_path), "sub/perm", {"clip_l": vec()}, dti_metadata(steps=1))
        assert os.stat(path).st_mode & 0o777 == mode
        # replacing an existing file (overwrite) gives the new file the same normal mode
        os.chmod(path, 0o600)
        save_embedding(str(tmp_path), "sub/perm", {"clip_l": vec(seed=1)}, overwrite=True)
        assert os.stat(path).st_mode & 0o777 == mode
        assert ef._current_umask() == umask
    finally:
        os.umask(old)
    assert all_files(tmp_path) == ["sub/perm.safetensors"]
