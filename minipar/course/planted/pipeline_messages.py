"""The corpus of exercise pipeline_messages (The executor's activation and gradient send and receive for one
micro-batch): wrong solutions that its checks must fail with the words of ``expect``, and correct alternatives
they must pass.

Teacher-only: left out of the student version.
"""
from minipar.course.planted.base import EXECUTOR, Planted

WRONG = (
    Planted("pipeline_messages", "one send buffer reused while its Isend is in flight", EXECUTOR,
            "        buffer = self._free_send_buffer(action)\n",
            "        if getattr(self, '_the_buffer', None) is None:\n            self._the_buffer = "
            "self._new_buffer(action)\n        buffer = self._the_buffer\n", "while its Isend was still in flight"),
    Planted("pipeline_messages", "every message sent to the next stage, gradients too", EXECUTOR,
            "request = self.comm.isend(buffer, peer_rank(action, self.num_stages, self.placement),",
            "request = self.comm.isend(buffer, (self.stage + 1) % self.num_stages,", "did not finish", limit=15),
    Planted("pipeline_messages", "the received activation is not a leaf that requires a gradient", EXECUTOR,
            'self._received[("activation", *key)] = Tensor(fresh, requires_grad=True)',
            'self._received[("activation", *key)] = Tensor(fresh)', "no gradient reached this stage"),
    Planted("pipeline_messages", "the receive buffer kept in the graph while MPI reuses it", EXECUTOR,
            "        fresh = buffer.copy()  # owned by the graph; the buffer goes straight back to MPI\n",
            "        fresh = buffer\n", "dL/d"),
    Planted("pipeline_messages", "near miss: each received array off by 1e-9 relative", EXECUTOR,
            "        fresh = buffer.copy()  # owned by the graph; the buffer goes straight back to MPI\n",
            "        fresh = buffer * (1 + 1e-9)\n", "dL/d"),
    Planted("pipeline_messages", "received arrays copied as Python floats (a float32 run turns float64)", EXECUTOR,
            "        fresh = buffer.copy()  # owned by the graph; the buffer goes straight back to MPI\n",
            "        fresh = buffer.astype(float)\n", "and dtype float64, but"),
)

ALTERNATIVES = (
    Planted("pipeline_messages", "the received array copied with xp.array", EXECUTOR,
            "        fresh = buffer.copy()  # owned by the graph; the buffer goes straight back to MPI\n",
            "        fresh = xp.array(buffer, copy=True)\n", ""),
    Planted("pipeline_messages", "a fresh send buffer for every message", EXECUTOR,
            "        buffer = self._free_send_buffer(action)\n        buffer[...] = payload\n",
            "        buffer = xp.ascontiguousarray(payload).copy()\n", ""),
)
