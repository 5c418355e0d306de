"""Upload of built folders to a Hub endpoint with huggingface_hub (`create_repo` with
`exist_ok`, then `upload_folder`), and the one-line reasons it fails with.

The token is read from an environment variable and passed to `HfApi` explicitly; it is never
printed, logged or written. A failure of the network or of the server (an HTTP error, an
answer huggingface_hub cannot read) becomes `UploadFailed`: one line with the endpoint, and for
an HTTP error the status and the server's message; the caller adds where the folders are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# The server's own message is cut to this many characters so that the reason stays one line.
_MESSAGE_CHARS = 200


class UploadFailed(Exception):
    """Why an upload stopped, in one line (endpoint, repository, status or network error)."""


def default_endpoint() -> str:
    """huggingface_hub's endpoint: HF_ENDPOINT when set, else the Hub."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT).rstrip("/")


def resolve_endpoint(endpoint: str | None) -> str:
    return (endpoint or default_endpoint()).rstrip("/")


def read_token(env: str) -> str | None:
    value = os.environ.get(env, "").strip()
    return value or None


@dataclass(frozen=True)
class Uploaded:
    repo_id: str  # with the namespace the server resolved
    url: str
    commit: str


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 3] + "..."


# huggingface_hub's HTTP client raises its transport errors (refused, reset, timed out) from
# its own package (httpx in 1.x, httpx2 in 2.x); they are told apart by where they come from.
_TRANSPORTS = ("httpx", "httpx2", "httpcore", "h11", "h2")


def _network_error(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return True
    return any(cls.__module__.split(".")[0] in _TRANSPORTS for cls in type(e).__mro__)


def upload_folder(
    folder: Path, repo_id: str, *, endpoint: str, token: str, private: bool, message: str
) -> Uploaded:
    """Create the model repository (kept if it exists) and commit every file of `folder`."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token)
    step = "create repo"
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        step = "upload"
        info = api.upload_folder(
            folder_path=folder,
            repo_id=url.repo_id,
            repo_type="model",
            commit_message=message,
        )
    except HfHubHTTPError as e:
        response = getattr(e, "response", None)
        status = getattr(response, "status_code", None)
        said = getattr(e, "server_message", None) or str(e).splitlines()[0]
        raise UploadFailed(
            f"{endpoint} answered HTTP {status} to {step} of {repo_id} ({_one_line(str(said))})"
        ) from e
    except ValueError as e:  # huggingface_hub's word for an answer it cannot read
        raise UploadFailed(
            f"{endpoint} gave an answer huggingface_hub cannot read ({step} of {repo_id}): "
            f"{_one_line(str(e))}"
        ) from e
    except Exception as e:
        if not _network_error(e):
            raise
        raise UploadFailed(
            f"cannot reach {endpoint} ({step} of {repo_id}): {type(e).__name__}: "
            f"{_one_line(str(e)) or 'no answer'}"
        ) from e
    return Uploaded(url.repo_id, str(url).rstrip("/"), str(info.oid))
