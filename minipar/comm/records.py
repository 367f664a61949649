"""What the Communicator keeps about its calls: per-call records, listeners and pending requests.

``CallRecord`` is one line of a rank's traffic ledger (calls, elements, bytes, seconds);
``Counters`` maps a call's name to its record; ``Bookkeeping`` (mixed into the Communicator) books
each call into them and tells the listeners; ``Request`` is a non-blocking call still in flight,
whose wait() finishes it and books the time it blocked.
"""
import time
from dataclasses import asdict, dataclass

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


class Bookkeeping:
    """Mixed into ``Communicator``, whose ``__init__`` sets ``counters = Counters()`` and ``_listeners = []``."""

    def reset_counters(self):
        self.counters = Counters()

    def counters_snapshot(self):
        """The counters as plain nested dicts (safe to keep, compare or serialise)."""
        return {name: asdict(record) for name, record in self.counters.items()}

    def add_listener(self, listener):
        """Call ``listener(name, start, end, nbytes)`` after every call on this communicator."""
        self._listeners.append(listener)

    def remove_listener(self, listener):
        self._listeners.remove(listener)

    def _record_of(self, name):
        record = self.counters.get(name)  # not setdefault: that would build a CallRecord on every call
        if record is None:
            record = self.counters[name] = CallRecord()
        return record

    def _notify(self, name, start, end, nbytes):
        for listener in self._listeners:
            listener(name, start, end, nbytes)

    def _account(self, name, elements, traffic, started, nbytes, notify=True):
        finished = time.perf_counter()
        record = self._record_of(name)
        record.calls += 1
        record.elements += int(elements)
        record.bytes_sent += int(traffic.bytes_sent)
        record.bytes_received += int(traffic.bytes_received)
        record.seconds += finished - started
        if notify:
            self._notify(name, started, finished, nbytes)


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
