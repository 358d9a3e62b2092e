"""`fmnist serve`'s settings and their defaults, in one place: the command's options default to these, and each
worker process is handed them (as JSON in FMNIST_SERVE). Nothing here imports the serve extra, so that
`fmnist serve --help` shows the defaults where the extra is not installed."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    onnx: str = "export/fmnist.onnx"   # the exported model
    host: str = "127.0.0.1"     # where both transports listen; 0.0.0.0 for every network
    port: int = 8000            # REST (the Open Inference Protocol, /predict, the page, /metrics); 0: a free port
    grpc_port: int = 8001       # the same protocol over gRPC, as Triton's 8001; 0: none
    workers: int = 1            # server processes, each with its share of the cores
    max_batch: int = 256        # images in one onnxruntime run; 1 turns batching off (one run per request)
    max_delay_ms: float = 0.0   # how long a run waits for more requests after the first (0: only what queued)
    max_queue: int = 16384      # images waiting for a run; past that, 503: bounded memory under overload
    max_body_mb: float = 32.0   # request body; past that, 413
    threads: int = 0            # onnxruntime's intra-op threads in each process (0: its share of the cores)

    @property
    def max_body(self) -> int:
        return int(self.max_body_mb * 2**20)


DEFAULTS = Settings()
