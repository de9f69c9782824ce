"""Where the client finds the server and its API key: arguments, then ``KT_API_URL`` /
``KT_API_KEY``, then the saved login (``kt login``: ``~/.config/vfm-kt/credentials.json``, mode 0600;
``KT_CONFIG_DIR`` moves the folder)."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


def config_dir() -> Path:
    env = os.environ.get("KT_CONFIG_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "vfm-kt"


def credentials_path() -> Path:
    return config_dir() / "credentials.json"


@dataclass(frozen=True)
class Credentials:
    url: str
    api_key: str | None
    url_from: str = ""
    """Where ``url`` came from, for messages: "the argument", "KT_API_URL", the saved login, "the default"."""


def load_saved() -> Credentials | None:
    path = credentials_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); run `kt login` again") from err
    return Credentials(url=str(data.get("url") or DEFAULT_URL), api_key=data.get("api_key"))


def save(url: str, api_key: str) -> Path:
    """Write the login with mode 0600 (created so, never readable by others even for a moment)."""
    path = credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".credentials-", suffix=".json")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"url": url, "api_key": api_key}, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def forget() -> bool:
    """Delete the saved login; False when there was none."""
    try:
        credentials_path().unlink()
    except FileNotFoundError:
        return False
    return True


def resolve(url: str | None = None, api_key: str | None = None) -> Credentials:
    """Arguments first, then the environment, then the saved login, then the local default URL."""
    saved = load_saved() if url is None or api_key is None else None
    sources = [
        (url, "the argument"),
        (os.environ.get("KT_API_URL"), "KT_API_URL"),
        (saved.url if saved else None, f"the saved login ({credentials_path()})"),
        (DEFAULT_URL, "the default (no KT_API_URL, no saved login)"),
    ]
    url_found, url_from = next((str(value), source) for value, source in sources if value)
    api_key = api_key or os.environ.get("KT_API_KEY") or (saved.api_key if saved else None)
    return Credentials(url=url_found.rstrip("/"), api_key=api_key, url_from=url_from)
