"""A small Python client of the ZeroQ service, on Debian's python3-grpcio.

The message and stub modules are generated from proto/zeroq/v1/zeroq.proto
at build time (into build/python); put that folder on PYTHONPATH:

    from zeroq_client import ZeroQClient
    c = ZeroQClient("127.0.0.1:50051")
    model = c.wait_for_model(c.upload_model("net.pt", "net", [3, 32, 32]).id)
    job = c.submit_job(model.id, budget="MP4")
    for event in c.watch_job(job.id):
        print(event.seq, event.message)
    c.download_artifact(job.id, "model.zeroq.pt", "net.zeroq.pt")

submit_job's keywords are QuantizationConfig's fields; the two methods also
take the words of the zeroq command line (common/config_schema.h):

    c.submit_job(model.id, weight_bits=4, activation_range="percentile",
                 activation_percentile=99.99, reconstruct="block",
                 reconstruction=pb.ReconstructionConfig(iterations=200),
                 distillation=pb.DistillationConfig(early_stop_window=150,
                                                    early_stop_tolerance=0.01))
"""
import hashlib
import os
import time

import grpc

from zeroq.v1 import zeroq_pb2 as pb
from zeroq.v1 import zeroq_pb2_grpc as pb_grpc

CHUNK = 1 << 20
# Enum fields of QuantizationConfig that also take a method's word
# ("percentile", "block"): the enum value's name without this prefix.
METHOD_FIELDS = {"activation_range": "ACTIVATION_RANGE_", "reconstruct": "RECONSTRUCT_"}


class ZeroQClient:
    def __init__(self, target, api_key=None, channel=None):
        self.channel = channel or grpc.insecure_channel(target)
        self.stub = pb_grpc.ZeroQStub(self.channel)
        self.metadata = [("authorization", "Bearer " + api_key)] if api_key else None

    def upload_model(self, path, name, input_shape):
        with open(path, "rb") as f:
            data = f.read()
        meta = pb.ModelMetadata(name=name, input_shape=list(input_shape), size_bytes=len(data),
                                sha256=hashlib.sha256(data).hexdigest())

        def requests():
            yield pb.UploadModelRequest(metadata=meta)
            for off in range(0, len(data), CHUNK):
                yield pb.UploadModelRequest(chunk=data[off:off + CHUNK])

        return self.stub.UploadModel(requests(), metadata=self.metadata)

    def get_model(self, model_id):
        return self.stub.GetModel(pb.GetModelRequest(model_id=model_id), metadata=self.metadata)

    def wait_for_model(self, model_id, timeout=120.0):
        deadline = time.monotonic() + timeout
        while True:
            m = self.get_model(model_id)
            if m.state != pb.MODEL_INSPECTING:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"model {model_id} still inspecting after {timeout}s")
            time.sleep(0.05)

    def submit_job(self, model_id, config=None, request_id="", priority=0, **fields):
        for field, prefix in METHOD_FIELDS.items():
            if isinstance(fields.get(field), str) and not fields[field].startswith(prefix):
                fields[field] = prefix + fields[field].upper()
        config = config or pb.QuantizationConfig(**fields)
        return self.stub.SubmitJob(pb.SubmitJobRequest(model_id=model_id, config=config,
                                                       request_id=request_id, priority=priority),
                                   metadata=self.metadata)

    def get_job(self, job_id):
        return self.stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=self.metadata)

    def cancel_job(self, job_id):
        return self.stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=self.metadata)

    def delete_job(self, job_id):
        """Deletes a finished job and its artifacts; returns the bytes freed."""
        return self.stub.DeleteJob(pb.DeleteJobRequest(job_id=job_id),
                                   metadata=self.metadata).freed_bytes

    def delete_model(self, model_id):
        self.stub.DeleteModel(pb.DeleteModelRequest(model_id=model_id), metadata=self.metadata)

    def watch_job(self, job_id, after_seq=0, heartbeats=False):
        """Yields events until the job finishes, reconnecting after a drop."""
        cursor = after_seq
        while True:
            try:
                for e in self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after_seq=cursor),
                                            metadata=self.metadata):
                    if e.type == pb.EVENT_HEARTBEAT:
                        if heartbeats:
                            yield e
                        continue
                    cursor = e.seq
                    yield e
                return
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                time.sleep(0.2)

    def download_artifact(self, job_id, artifact, path):
        """Writes the artifact to path and checks its SHA-256; returns its size."""
        h = hashlib.sha256()
        size, want = None, None
        with open(path + ".part", "wb") as out:
            for chunk in self.stub.DownloadArtifact(
                    pb.DownloadArtifactRequest(job_id=job_id, artifact=artifact),
                    metadata=self.metadata):
                if size is None:
                    size, want = chunk.size_bytes, chunk.sha256
                out.write(chunk.data)
                h.update(chunk.data)
        if h.hexdigest() != want:
            os.remove(path + ".part")
            raise IOError(f"{artifact}: SHA-256 mismatch")
        os.replace(path + ".part", path)
        return size
