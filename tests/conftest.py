import logging
import uuid

import pytest


@pytest.fixture(scope="session")
def moto_server():
    """An in-process S3 server (moto) for the session; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # One access-log line per request would bury a failing test's own report.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(moto_server, monkeypatch):
    """A fresh bucket on the moto server, with the environment pointing boto3/s3fs at it.

    Yields the bucket name; code under test reaches it as s3://NAME/... through AWS_ENDPOINT_URL.
    """
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    # s3fs caches instances by arguments, not by environment: drop ones made for other servers.
    s3fs.S3FileSystem.clear_instance_cache()
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    yield name
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def faulty_s3(s3_bucket, moto_server, monkeypatch):
    """(bucket, proxy): ``s3_bucket`` reached through a fault-injecting proxy (tests/_fault_proxy.py).

    AWS_ENDPOINT_URL points at the proxy and botocore makes one attempt per call
    (AWS_MAX_ATTEMPTS=1), so the faults reach s3fs's and the job's own retries.
    """
    import s3fs

    from _fault_proxy import FaultProxy

    proxy = FaultProxy(moto_server).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_bucket, proxy
    proxy.stop()
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def run_in_process():
    """``pipeline.run_job`` with the stages run in this process (``execution.InProcess``): the
    real driver loop (plan, passes, shard assembly, commits) without Ray."""
    from jobs.infer import pipeline
    from jobs.infer.execution import InProcess

    execution = InProcess()
    return lambda cfg, **kw: pipeline.run_job(cfg, execution=execution, **kw)
