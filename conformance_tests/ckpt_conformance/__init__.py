"""ckpt's backend conformance suite.

A third-party backend runs it against itself by subclassing one class and providing one
fixture, a fresh root URL for its store::

    from ckpt_conformance import BackendConformance

    class TestMyStore(BackendConformance):
        @pytest.fixture
        def ckpt_root(self, my_server):
            return f"mystore://bucket/{uuid.uuid4().hex}"

or runs ``pytest --pyargs ckpt_conformance --ckpt-root URL``. Every strategy the backend
declares it supports is exercised; what its capabilities rule out is skipped, and the skip
says why. Assertions check the store out of band with raw fsspec, not only through the
backend under test (override ``ckpt_storage_options`` to reach your store that way).
"""

from ckpt_conformance.suite import BackendConformance

__all__ = ["BackendConformance"]
