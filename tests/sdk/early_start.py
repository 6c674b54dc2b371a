"""Ready means ready: run right after `twinkle serve` starts, before the applications are up.

The gateway (application not registered yet) and the server (configured model still starting)
answer 503 + Retry-After, which the unmodified SDK retries, so this succeeds instead of failing
with `404 base model ... is not served here`.
"""
import time

from common import ready, MODEL, check, datum, loss_of, result, service

t0 = time.monotonic()
sc = service()
caps = sc.get_server_capabilities()
names = [m.model_name for m in caps.supported_models]
check(MODEL in names, f"{MODEL} not in capabilities {names}")
tc = ready(sc.create_lora_training_client(base_model=MODEL, rank=4))
fb = tc.forward_backward([datum([1, 2, 3, 4], [5, 6])], "cross_entropy").result()
result(models=names, loss=loss_of(fb), waited_s=time.monotonic() - t0)
