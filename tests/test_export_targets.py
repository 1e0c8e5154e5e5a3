"""Issue 18, points 1-2: an export never deletes or overwrites what the studio did not write, and the web UI only
writes exports under the studio home (or folders allowed with --allow-path)."""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from studio.tuned import export
from studio import safepaths


@pytest.fixture(autouse=True)
def _no_allowed():
    safepaths.allow([])
    yield
    safepaths.allow([])


def _user_tree(root):
    """A folder of the user's with an export.json of their own (not the studio's) and other files."""
    root.mkdir(parents=True)
    (root / "export.json").write_text('{"my": "settings"}')
    (root / "notes.md").write_text("my notes")
    (root / "sub").mkdir()
    (root / "sub" / "data.txt").write_text("precious")
    return root


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_folder_with_a_foreign_export_json_is_refused_and_kept(tmp_path):
    mine = _user_tree(tmp_path / "important")
    before = _files(mine)
    for overwrite in (False, True):
        with pytest.raises(safepaths.PathRefused, match="did not write"):
            safepaths.prepare_folder(mine, "adapter", overwrite=overwrite)
    assert _files(mine) == before
    assert (mine / "sub" / "data.txt").read_text() == "precious"


def test_cli_export_into_a_users_folder_deletes_nothing(run_dir, tmp_path):
    from studio.cli import main

    mine = _user_tree(tmp_path / "important")
    (mine / "thesis.txt").write_text("years of work")
    before = _files(mine)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["export", str(run_dir), "--format", "adapter", "--out", str(mine), "--overwrite"]) == 1
    assert "did not write" in err.getvalue()
    assert _files(mine) == before and (mine / "thesis.txt").read_text() == "years of work"


def test_an_earlier_export_is_replaced_only_with_overwrite_and_only_its_own_files(run_dir, tmp_path):
    out = tmp_path / "again"
    first = export.export_adapter(run_dir, out)
    assert json.loads((out / "export.json").read_text())["written_by"] == safepaths.MARKER
    with pytest.raises(export.ExportError, match="earlier adapter export.*overwrite"):
        export.export_adapter(run_dir, out)
    # the user drops a file in: the studio will no longer take the folder for its own
    (out / "README-mine.txt").write_text("mine")
    with pytest.raises(export.ExportError, match="README-mine.txt"):
        export.export_adapter(run_dir, out, overwrite=True)
    assert (out / "README-mine.txt").read_text() == "mine"
    (out / "README-mine.txt").unlink()
    second = export.export_adapter(run_dir, out, overwrite=True)
    assert sorted(second.files) == sorted(first.files)
    with pytest.raises(export.ExportError, match="'adapter' export, not 'merged'"):
        export.export_merged(run_dir, out, overwrite=True)


def test_a_manifest_listing_paths_outside_its_folder_removes_nothing_there(tmp_path):
    outside = tmp_path / "thesis.txt"
    outside.write_text("keep")
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "a.bin").write_text("x")
    rec = safepaths.file_record(folder / "a.bin")
    (folder / "export.json").write_text(json.dumps({"written_by": "kto-studio", "format": "adapter",
                                                    "files": ["a.bin", "../thesis.txt", str(outside)],
                                                    "hashes": {"a.bin": rec, "../thesis.txt": rec,
                                                               str(outside): rec}}))
    safepaths.prepare_folder(folder, "adapter", overwrite=True)
    assert outside.read_text() == "keep" and not any(folder.iterdir())


def test_gguf_file_export_never_overwrites_a_sibling_modelfile_or_manifest(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "model.Modelfile").write_text("FROM mine")
    names = ["model.gguf", "model.Modelfile", "model.export.json"]
    for overwrite in (False, True):
        with pytest.raises(safepaths.PathRefused, match="model.Modelfile already exists.*did not write"):
            safepaths.prepare_files(folder, names, "gguf", "model.export.json", overwrite=overwrite)
    (folder / "model.Modelfile").unlink()
    (folder / "model.export.json").write_text('{"mine": true}')
    with pytest.raises(safepaths.PathRefused, match="model.export.json already exists"):
        safepaths.prepare_files(folder, names, "gguf", "model.export.json", overwrite=True)
    assert (folder / "model.export.json").read_text() == '{"mine": true}'


def test_gguf_file_export_refuses_before_any_work(run_dir, tmp_path):
    (tmp_path / "model.Modelfile").write_text("FROM mine")
    with pytest.raises(export.ExportError, match="model.Modelfile already exists"):
        export.export_gguf(run_dir, tmp_path / "model.gguf", overwrite=True)
    assert (tmp_path / "model.Modelfile").read_text() == "FROM mine"
    assert not (tmp_path / "model.gguf").exists()


def test_ui_export_targets_stay_in_the_studio_home(studio_home, tmp_path):
    home = studio_home.resolve()
    assert safepaths.ui_export_target("", "run-adapter") == home / "exports" / "run-adapter"
    assert safepaths.ui_export_target("mine/x", "d") == home / "exports" / "mine" / "x"
    for bad in ("/etc/cron.d/x", "../../../../etc/cron.d", "~/x", str(tmp_path / "elsewhere")):
        with pytest.raises(safepaths.PathRefused, match="--allow-path"):
            safepaths.ui_export_target(bad, "d")
    # a link inside the home to a folder outside it is judged by where it points
    (home / "exports").mkdir(parents=True, exist_ok=True)
    (home / "exports" / "link").symlink_to(tmp_path)
    with pytest.raises(safepaths.PathRefused):
        safepaths.ui_export_target("link/x", "d")
    safepaths.allow([tmp_path])
    assert safepaths.ui_export_target(str(tmp_path / "elsewhere"), "d") == (tmp_path / "elsewhere").resolve()


def test_ui_reads_only_the_home_uploads_sample_and_allowed_folders(studio_home, tmp_path):
    from studio.config.run import SAMPLE_DATA
    from studio.data import resolve

    secret = tmp_path / "creds.csv"
    secret.write_text("user,password\nroot,hunter2\n")
    for bad in (str(secret), "~/../../" + str(secret).lstrip("/"), "../" * 12 + str(secret).lstrip("/")):
        with pytest.raises(safepaths.PathRefused) as e:
            safepaths.check_read(bad)
        assert "hunter2" not in str(e.value) and "password" not in str(e.value)
    assert safepaths.check_read(resolve(SAMPLE_DATA))
    assert safepaths.check_read("Anthropic/hh-rlhf") == "Anthropic/hh-rlhf"  # a hub id is not a local path
    (studio_home / "data").mkdir(parents=True, exist_ok=True)
    (studio_home / "data" / "ok.jsonl").write_text("{}\n")
    assert safepaths.check_read(str(studio_home / "data" / "ok.jsonl"))
    safepaths.allow([tmp_path])
    assert safepaths.check_read(str(secret)) == str(secret.resolve())


# ---- issue 28, case 2: deletion only of what the studio can prove it wrote ------------------------------------

def _old_format_folder(root):
    """notes.txt, sub/f.txt and an export.json shaped like an older studio manifest (no sizes, no hashes)."""
    d = root / "d"
    (d / "sub").mkdir(parents=True)
    (d / "notes.txt").write_text("my notes")
    (d / "sub" / "f.txt").write_text("mine too")
    (d / "export.json").write_text(json.dumps({"format": "adapter", "path": str(d), "files": ["notes.txt", "sub"],
                                               "checks": {}, "source": {}}))
    return d


def test_an_old_format_manifest_never_gets_the_users_files_deleted(tmp_path):
    d = _old_format_folder(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(safepaths.PathRefused, match="older studio.*sizes and hashes.*delete or move.*new or empty"):
            safepaths.prepare_folder(d, "adapter", overwrite=overwrite)
    assert (d / "notes.txt").read_text() == "my notes" and (d / "sub" / "f.txt").read_text() == "mine too"
    # alone in its folder, an old manifest only lets the export write there (it is replaced by the new one)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "export.json").write_text(json.dumps({"format": "adapter", "path": "x", "files": ["a"], "checks": {},
                                                   "source": {}}))
    assert safepaths.prepare_folder(alone, "adapter", overwrite=True) == alone


def test_cli_export_over_an_old_format_manifest_deletes_nothing(run_dir, tmp_path):
    from studio.cli import main

    d = _old_format_folder(tmp_path)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["export", str(run_dir), "--format", "adapter", "--out", str(d), "--overwrite"])
    assert code != 0 and "sizes and hashes" in err.getvalue()
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*")) == ["export.json", "notes.txt", "sub",
                                                                         "sub/f.txt"]


def test_replace_deletes_only_files_whose_size_and_hash_match_the_manifest(run_dir, tmp_path):
    out = tmp_path / "exp"
    first = export.export_adapter(run_dir, out)
    m = json.loads((out / "export.json").read_text())
    assert set(m["hashes"]) == set(first.files) - {"export.json"}
    assert all(len(r["sha256"]) == 64 and r["size"] > 0 for r in m["hashes"].values())
    # a file changed since (same name, other bytes): nothing is deleted
    cfg = out / "adapter_config.json"
    kept = cfg.read_text()
    cfg.write_text(kept.replace("{", "{ ", 1))
    with pytest.raises(export.ExportError, match="changed since.*adapter_config.json"):
        export.export_adapter(run_dir, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == sorted({*first.files, "export.json"})
    cfg.write_text(kept)
    # a sub-folder is never taken wholesale: a file in it that the manifest does not record keeps it all
    (out / "extra").mkdir()
    (out / "extra" / "mine.txt").write_text("keep")
    with pytest.raises(export.ExportError, match="extra/mine.txt"):
        export.export_adapter(run_dir, out, overwrite=True)
    (out / "extra" / "mine.txt").unlink()
    (out / "extra").rmdir()
    again = export.export_adapter(run_dir, out, overwrite=True)
    assert sorted(again.files) == sorted(first.files)
