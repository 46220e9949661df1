"""NovoPen 6 / NovoPen Echo Plus dose logs through a PN532-class NFC reader on a UART.

Supported features: pen identity (serial, model, software), the whole dose log
(relative time, units, flags) with wall time from the pen clock read in the same
session, prime (air shot) heuristic, insulin from configuration, de-duplication key.
Never writes to the pen's memory.

Expected device path: /dev/ttyS1 or /dev/ttyUSB0 (PN532 in HSU mode, 115200 8N1).

Stack, outer to inner, each a pure codec with the I/O kept here in ``Device``:
``pn532`` (UART frames) -> ``type4`` (ISO 7816-4 APDUs on a Type 4 tag) ->
``phd`` (NDEF "PHD" records) -> ``ieee11073``/``pmstore`` (IEEE 11073-20601) ->
``doses`` (records). ``session`` runs one read over any transceive function.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import ClassVar

from drivers.base import SerialTransport
from drivers.errors import DriverError, InvalidResponse, NoPen, NoResponse
from drivers.models import InsulinDose, PenIdentity
from drivers.novopen import pn532
from drivers.novopen.capture import decode_capture
from drivers.novopen.doses import DEFAULT_PRIME_RULE, Interpreted, PrimeRule, interpret, to_doses
from drivers.novopen.session import SessionState, run_session

__all__ = ["PROTOCOL", "Device", "NoPen", "PenRead", "decode_capture"]

log = logging.getLogger(__name__)

PROTOCOL = "novopen"


@dataclasses.dataclass(frozen=True, slots=True)
class PenRead:
    """The outcome of one pen read: identity, the valid doses, and whether the log was read to its end."""

    identity: PenIdentity
    doses: tuple[InsulinDose, ...]
    complete: bool
    error: str | None = None
    rejected: tuple[Interpreted, ...] = ()  # entries that are not doses (NaN, bad flags ...), for the log
    pen_clock_s: int | None = None  # pen relative clock from the MDS attributes
    read_at: dt.datetime | None = None  # agent UTC clock when that pen clock was read


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Device(SerialTransport):
    """A PN532 reader on a serial port, and the pen held to it."""

    PROTOCOL: ClassVar[str] = PROTOCOL
    BAUDRATE: ClassVar[int] = 115200
    TIMEOUT: ClassVar[float] = 0.02  # per port read; deadlines below bound every wait

    def __init__(
        self,
        url: str,
        *,
        ack_timeout: float = 0.3,
        response_timeout: float = 1.5,
        pen_wait_s: float = 3.0,
        retries: int = 3,
        now: Callable[[], dt.datetime] = _utc_now,
    ) -> None:
        super().__init__(url)
        self.ack_timeout = ack_timeout
        self.response_timeout = response_timeout
        self.pen_wait_s = pen_wait_s
        self.retries = retries
        self.now = now
        self._splitter = pn532.FrameSplitter()
        self._tokens: deque[pn532.Token] = deque()

    def __enter__(self) -> Device:
        return self

    # --- reader I/O -------------------------------------------------------------------------------
    def _read_some(self) -> bytes:
        data = self.read(1)
        if data:
            waiting = self.waiting()
            if waiting:
                data += self.read(waiting)
        return data

    def _next_token(self, timeout: float) -> pn532.Token | None:
        deadline = time.monotonic() + timeout
        while not self._tokens:
            if time.monotonic() >= deadline:
                return None
            self._tokens.extend(self._splitter.feed(self._read_some()))
        return self._tokens.popleft()

    def _discard_stale(self) -> None:
        self._tokens.clear()
        self._splitter = pn532.FrameSplitter()
        self.flush_input()

    def command(self, frame: pn532.Frame, timeout: float | None = None) -> bytes:
        """Send one command; wait for its ACK (resending if none) and its reply (NACKing bad frames)."""
        self._discard_stale()
        wire = pn532.encode_frame(frame)
        for attempt in range(self.retries):
            self.write(wire)
            token = self._next_token(self.ack_timeout)
            if isinstance(token, pn532.Ack):
                break
            log.debug("command 0x%02X: no ACK (attempt %d, got %r)", frame.command, attempt + 1, token)
        else:
            raise NoResponse(f"reader did not acknowledge command 0x{frame.command:02X}")
        nacks = 0
        while True:
            token = self._next_token(self.response_timeout if timeout is None else timeout)
            if token is None:
                self.write(pn532.ACK_FRAME)  # aborts the running command (UM0701 §6.2.1.3)
                raise NoResponse(f"reader sent no reply to command 0x{frame.command:02X}")
            if isinstance(token, pn532.Frame):
                return pn532.expect_reply(frame, token)
            if isinstance(token, pn532.ErrorFrame):
                raise pn532.Pn532Error(f"reader rejected command 0x{frame.command:02X} (error frame)")
            if isinstance(token, pn532.BadFrame):
                nacks += 1
                if nacks > self.retries:
                    raise token.error
                log.debug("reply to 0x%02X damaged (%s): NACK", frame.command, token.error)
                self.write(pn532.NACK_FRAME)

    def wake(self) -> None:
        self.write(pn532.WAKEUP)
        try:
            self.command(pn532.sam_configuration())
        except NoResponse:
            self.write(pn532.WAKEUP)
            self.command(pn532.sam_configuration())
        self.command(pn532.rf_max_retries())

    def find_target(self, wait_s: float | None = None) -> pn532.Target:
        deadline = time.monotonic() + (self.pen_wait_s if wait_s is None else wait_s)
        while True:
            target = pn532.parse_in_list_passive_target(self.command(pn532.in_list_passive_target()))
            if target is not None:
                if not target.iso_dep:
                    raise InvalidResponse(f"target SEL_RES 0x{target.sel_res:02X} is not ISO-DEP: not a pen")
                return target
            if time.monotonic() >= deadline:
                raise NoPen("no pen in the reader's field")

    def transceive(self, capdu: bytes) -> bytes:
        """One ISO 7816-4 APDU to the pen through InDataExchange."""
        params = self.command(pn532.in_data_exchange(capdu))
        if not params:
            raise InvalidResponse("InDataExchange reply without status byte")
        error = pn532.exchange_status_error(params[0])
        if error is not None:
            raise error
        return params[1:]

    def release(self) -> None:
        try:
            self.command(pn532.in_release())
        except DriverError as exc:
            log.debug("InRelease failed: %s", exc)

    # --- the read ---------------------------------------------------------------------------------
    def read_pen(
        self,
        insulin: Mapping[str, str] | None = None,
        *,
        prime_rule: PrimeRule = DEFAULT_PRIME_RULE,
        wait_s: float | None = None,
    ) -> PenRead:
        """Read the pen in the field. A read cut short still returns what verified (``complete`` False);
        it raises only when not even the pen's identity came through."""
        state = SessionState()
        error: str | None = None
        self.wake()
        try:
            target = self.find_target(wait_s)
            log.debug("target %s in the field", target.uid.hex())
            run_session(self.transceive, state, self.now)
        except DriverError as exc:
            if state.identity is None:
                raise
            error = f"{type(exc).__name__}: {exc}"
            log.warning("pen %s: read cut off after %d reports: %s", state.identity.serial, len(state.reports), error)
        finally:
            self.release()
        identity = state.identity
        if identity is None:  # run_session returned without raising, so MDS was read
            raise InvalidResponse("pen read ended without identity")
        items = interpret(state.reports, prime_rule)
        return PenRead(
            identity=identity,
            doses=to_doses(identity.serial, items, state.received_at, insulin),
            complete=state.complete,
            error=error,
            rejected=tuple(i for i in items if not i.valid),
            pen_clock_s=state.mds.relative_time if state.mds else None,
            read_at=state.mds_read_at,
        )
