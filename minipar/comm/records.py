"""What the Communicator keeps about its calls: per-call records and pending requests.

``CallRecord`` is one line of a rank's traffic ledger (calls, elements, bytes, seconds);
``Counters`` maps a call's name to its record; ``Request`` is a non-blocking call still in
flight, whose wait() finishes it and books the time it blocked.
"""
import time
from dataclasses import dataclass

from minipar.backend import from_host


@dataclass
class CallRecord:
    """What one rank did through one kind of call since the last reset."""

    calls: int = 0
    elements: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


class Counters(dict):
    """``name -> CallRecord``; a name never called reads as all zeros."""

    def __missing__(self, name):
        return CallRecord()


class Request:
    """A pending non-blocking call; ``wait()`` finishes it and returns the result array."""

    def __init__(self, communicator, name, mpi_request, host_buffer, result, nbytes, started):
        self._communicator, self._name = communicator, name
        self._mpi_request, self._host_buffer, self._result = mpi_request, host_buffer, result
        self._nbytes, self._started = nbytes, started
        self.done = False

    def wait(self):
        if not self.done:
            waiting_since = time.perf_counter()
            self._mpi_request.Wait()
            self._finish(waiting_since)
        return self._result

    def test(self):
        """True (and the result in place) if the call has completed, without blocking."""
        if not self.done:
            testing_since = time.perf_counter()
            if self._mpi_request.Test():
                self._finish(testing_since)
        return self.done

    def _finish(self, blocked_since):
        if self._host_buffer is not None and self._host_buffer is not self._result:
            self._result[...] = from_host(self._host_buffer)  # only under CuPy
        self.done = True
        finished = time.perf_counter()
        record = self._communicator._record_of(self._name)
        record.seconds += finished - blocked_since
        self._communicator._notify(self._name, self._started, finished, self._nbytes)
