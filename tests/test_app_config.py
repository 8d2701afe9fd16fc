"""The app's Streamlit settings (.streamlit/config.toml): quiet when idle, no file watching
of the environment, the data home or the models."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def config() -> dict:
    return tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())


def test_no_file_watching_of_environment_data_or_models():
    server = config()["server"]
    assert server["fileWatcherType"] == "none"
    blacklist = set(server["folderWatchBlacklist"])
    assert {".venv", "data", "leaml/tiny/assets"} <= blacklist


def test_streamlit_reads_these_settings():
    # option names Streamlit 1.67 knows (a misspelt key would be ignored silently)
    from streamlit import config as st_config
    options = st_config._config_options_template
    for key in config()["server"]:
        assert f"server.{key}" in options, f"server.{key} is not a Streamlit option"
