import os
import socket
import tempfile
from pathlib import Path

# huggingface_hub reads these at import: point it at the test hub before anything imports it.
# The converted default model stays in the user's real cache so tests do not redo it.
os.environ.setdefault("HF_KEDIT_CACHE", str(Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
                                          / "hf_kedit"))
with socket.socket() as _sock:
    _sock.bind(("127.0.0.1", 0))
    _PORT = _sock.getsockname()[1]
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{_PORT}"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="kedit-hf-home-")
os.environ["HF_TOKEN"] = "test-token"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from hub_server import HubServer  # noqa: E402


@pytest.fixture(scope="session")
def hub_server():
    server = HubServer(port=_PORT).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model, loaded once for the session (tests must not change it)."""
    from hf_kedit.models import load_default

    return load_default()


@pytest.fixture(scope="session")
def tokenizer(request):
    """The default model's tokenizer, for tiny models built on its vocabulary: read from the
    cache when the model was converted before, else from the model (converted once). Modules
    that load the default model anyway define their own `tokenizer` from it."""
    from transformers import AutoTokenizer

    from hf_kedit.models import default_cache_dir

    cache = default_cache_dir()
    if (cache / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cache)
    return request.getfixturevalue("default_model")[1]


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine they spin: run on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
