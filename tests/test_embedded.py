"""The embedded PostgreSQL's data folders: a throwaway server leaves nothing behind, and
relocated folders (root runs keep data under /var/tmp) whose origin is gone are swept."""

import os
from pathlib import Path

import embedded.servers as servers
from embedded.servers import ORIGIN_FILE, EmbeddedPostgres, sweep_relocated


def relocated(root: Path, name: str, origin: Path | None, pid: int | None = None) -> Path:
    folder = root / f"sluice-{name}"
    (folder / "pg").mkdir(parents=True)
    (folder / "pg" / "PG_VERSION").write_text("17\n")
    if origin is not None:
        (folder / ORIGIN_FILE).write_text(str(origin))
    if pid is not None:
        (folder / "pg" / "postmaster.pid").write_text(f"{pid}\n/some/dir\n")
    return folder


def test_sweep_deletes_only_folders_whose_origin_is_gone_and_no_server_uses(tmp_path, monkeypatch):
    root = tmp_path / "vartmp"
    monkeypatch.setattr(servers, "RELOCATED", root)
    (tmp_path / "here").mkdir()
    gone = relocated(root, "gone", tmp_path / "deleted-session" / "pgdata")
    kept = relocated(root, "kept", tmp_path / "here" / "pgdata")
    unknown = relocated(root, "unknown", None)  # an older layout: not ours to judge
    live = relocated(root, "live", tmp_path / "deleted-too" / "pgdata", pid=os.getpid())
    mine = relocated(root, "mine", tmp_path / "deleted-three" / "pgdata")
    assert sweep_relocated(keep=mine) == [gone]
    assert not gone.exists()
    assert kept.exists() and unknown.exists() and live.exists() and mine.exists()


def test_a_throwaway_server_removes_its_data(tmp_path):
    pg = EmbeddedPostgres(tmp_path / "pgdata").start()
    data = pg.data_dir
    assert (data / "PG_VERSION").exists()
    if pg.origin is not None:  # run as root: relocated, and it says where it belongs
        assert (data.parent / ORIGIN_FILE).read_text() == str(tmp_path / "pgdata")
    pg.remove()
    assert not data.exists()
    assert pg.proc is None
