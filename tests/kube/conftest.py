import pytest

from tests.kube.fake_apiserver import FakeApiServer


@pytest.fixture
def apiserver():
    """A small Kubernetes API server with the API's semantics (see fake_apiserver.py)."""
    api = FakeApiServer()
    api.start()
    yield api
    api.stop()
