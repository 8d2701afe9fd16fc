"""pages/projects.py: create a project, import a zip, row-by-row report of bad rows (AppTest)."""
import io
import zipfile

from apphelp import add_users, button, home_db, make_project, page, small_manifest

from leaml.store import projects as projects_store


def zip_of(folder) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return buf.getvalue()


def test_counts_and_create_project(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    make_project(db, tmp_path, "p1", labeled=2)
    at = page("pages/projects.py", users["expert"], "p1")
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images"] == "16" and metrics["Unlabeled train images"] == "10"
    at.text_input[0].set_value("kvasir")
    at.text_input[1].set_value("HuggingFaceTB/SmolVLM-256M-Instruct")
    button(at, "Create project").click().run()
    assert not at.exception
    assert projects_store.get_project(db, "kvasir")["base_model"].startswith("HuggingFaceTB/")


def test_bad_name_is_a_message(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    at = page("pages/projects.py", users["expert"])
    assert "No project yet" in at.info[0].value
    at.text_input[0].set_value("bad name!")
    button(at, "Create project").click().run()
    assert not at.exception and "not valid" in at.error[0].value


def test_viewer_sees_counts_but_no_forms(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    make_project(db, tmp_path, "p1")
    at = page("pages/projects.py", users["viewer"], "p1")
    assert not at.exception
    assert all(not b.label.startswith("Create") for b in at.button)


def test_import_upload_and_bad_rows(home, tmp_path):
    # the page hands the upload to app_service.import_upload; AppTest cannot upload files,
    # so the same call is made here (the e2e test uploads through the browser)
    import pytest

    from leaml.app import service as app_service
    from leaml.data.ingest import ImportRejected
    from leaml.store import connect
    db = connect(home)
    users = add_users(db)
    app_service.create_project(db, users["expert"], "up")
    small_manifest(tmp_path / "src", n_train=6, n_test=2)
    report = app_service.import_upload(db, users["expert"], "up", "set.zip",
                                       zip_of(tmp_path / "src"))
    assert report.images_added == 8
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "m.jsonl").write_text('{"image": "missing.png"}\n')
    with pytest.raises(ImportRejected) as err:
        app_service.import_upload(db, users["expert"], "up", "m.jsonl",
                                  (tmp_path / "bad" / "m.jsonl").read_bytes())
    assert err.value.report.errors[0].row == 1
    with pytest.raises(ValueError, match="unsupported file type"):
        app_service.import_upload(db, users["expert"], "up", "x.exe", b"MZ")
    with pytest.raises(PermissionError):
        app_service.import_upload(db, users["annotator"], "up", "set.zip", b"")


def test_tiles_show_an_import_at_once(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    from leaml.app import service as app_service
    app_service.create_project(db, users["expert"], "fresh")
    at = page("pages/projects.py", users["expert"], "fresh")
    assert {m.label: m.value for m in at.metric}["Images"] == "0"
    small_manifest(tmp_path / "src", n_train=6, n_test=2)
    at.file_uploader[0].set_value(("set.zip", zip_of(tmp_path / "src"), "application/zip"))
    button(at, "Import").click().run()
    assert not at.exception and "Import done." in at.success[0].value
    assert {m.label: m.value for m in at.metric}["Images"] == "8"  # the same run, not stale
    assert "8" in at.dataframe[0].value["images"].astype(str).tolist()


def test_export_download_for_viewers_not_annotators(monkeypatch, home, tmp_path):
    db = home_db(monkeypatch, home)
    users = add_users(db)
    make_project(db, tmp_path, "p1", labeled=2)
    for role, shown in (("viewer", True), ("expert", True), ("admin", True),
                        ("annotator", False)):
        at = page("pages/projects.py", users[role], "p1")
        assert not at.exception
        labels = [b.label for b in at.get("download_button")]
        assert ("Download curated QA (zip)" in labels) is shown, role
