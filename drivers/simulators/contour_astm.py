"""Contour (ASTM E1381/E1394) simulator, as in reference B.4/B.5/B.7.

Host EOT (in any state) -> meter ENQ; host ACK -> frames H, P, R..., L (one record per frame,
ETB except ETX on L), each sent again on NAK (six NAKs of one frame abort with EOT); after the
final ACK the meter sends EOT. Host NAK while idle -> EOT, then host ENQ -> ACK: remote command
mode (``R|`` ``D|`` / ``R|`` ``T|`` read the clock; ``W|`` is logged and ignored).

Options (attributes, set before the host's first EOT):

- ``frame_text_max``: split every record into frames of at most this many text characters
  (intermediate frames end in ETB without the record's CR, as E1381 allows; the standard limit
  is 240), so records span frames;
- ``lead_header``: answer the EOT with EOT, a whole header frame, then ENQ, as the Contour USB
  in glucometerutils' and glucodump's captures does; the transfer after the ACK starts with the
  header again as frame 1.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from drivers import contour_astm as codec
from drivers.simulators.base import Simulator

PRODUCT = "Bayer7410"
VERSIONS = "01.10\\01.05\\10.03"
CONFIG = "A=1^C=03^G=en^I=0200^R=0^S=01^U=0^V=10600^X=054070054054180154154254054154^Y=360126099054120054252099^Z=1"

IDLE, ENQ_SENT, TRANSFER, COMMAND_WAIT, COMMAND = "idle", "enq", "transfer", "command-wait", "command"


@dataclasses.dataclass(frozen=True, slots=True)
class _Out:
    """One frame of the transfer: a record or a piece of one."""

    text: str
    ends_record: bool  # False: an intermediate frame (ETB right after the text)
    result_start: bool  # the first frame of a result record
    result_end: bool  # the last frame of a result record


class ContourSimulator(Simulator):
    PROTOCOL: ClassVar[str] = codec.PROTOCOL
    DEFAULT_SERIAL: ClassVar[str] = "7410-1234567"

    frame_text_max: int | None = None
    lead_header: bool = False

    def setup(self) -> None:
        self.state = IDLE
        self._frames: list[_Out] = []
        self._index = 0
        self._naks = 0
        self._command = bytearray()
        self._pending_read = False

    def _header(self) -> str:
        clock = self.meter_now().strftime("%Y%m%d%H%M%S")
        return f"H|\\^&||sim001|{PRODUCT}^{VERSIONS}^{self.serial}^00000|{CONFIG}|{len(self.records)}|||||P|1|{clock}"

    def _records(self) -> list[_Out]:
        texts = [(self._header(), False), ("P|1", False)]
        texts += [(codec.encode_result(i, r), True) for i, r in enumerate(self.records, start=1)]
        texts.append(("L|1||N", False))
        frames: list[_Out] = []
        for text, is_result in texts:
            pieces = codec.split_record(text, self.frame_text_max) if self.frame_text_max else [text]
            for n, piece in enumerate(pieces):
                last = n == len(pieces) - 1
                frames.append(_Out(piece, last, is_result and n == 0, is_result and last))
        return frames

    def _send_frame(self) -> None:
        out = self._frames[self._index]
        final = self._index == len(self._frames) - 1
        frame = codec.encode_frame(codec.FIRST_FRAME + self._index, out.text, final=final, ends_record=out.ends_record)
        if self.mangler.bad_checksum():
            frame = frame[:-4] + (b"00" if frame[-4:-2] != b"00" else b"01") + codec.CRLF
        self.reply_delay()
        self.send(self.mangler.mangle(frame))

    def _advance(self) -> None:
        if self._frames[self._index].result_end:
            self.records_sent += 1
        self._index += 1
        self._naks = 0
        if self._index == len(self._frames):
            self.send(codec.EOT)
            self.state = IDLE
            return
        if self._frames[self._index].result_start:
            self.before_record()
        self._send_frame()

    def feed(self, data: bytes) -> None:
        for value in data:
            self._byte(bytes([value]))

    def _byte(self, b: bytes) -> None:
        if self.state == COMMAND and b != codec.EOT:
            self._command_byte(b)
            return
        if b == codec.EOT:
            self.commands_seen.append(b)
            if self.faults.switched_on:
                return  # a meter not in transfer mode does not answer
            self.reply_delay()
            if self.lead_header:
                self.send(codec.EOT + codec.encode_frame(codec.FIRST_FRAME, self._header(), final=False))
            self.send(codec.ENQ)
            self.state = ENQ_SENT
        elif b == codec.ACK and self.state == ENQ_SENT:
            self._frames, self._index, self._naks = self._records(), 0, 0
            self.state = TRANSFER
            self._send_frame()
        elif b == codec.ACK and self.state == TRANSFER:
            if self.mangler.repeat():
                self._send_frame()  # as if our ACK had been lost: the host must drop the repeat
            else:
                self._advance()
        elif b == codec.NAK and self.state == TRANSFER:
            self._naks += 1
            if self._naks > codec.MAX_RETRIES:
                self.send(codec.EOT)
                self.state = IDLE
            else:
                self._send_frame()
        elif b == codec.NAK and self.state in (IDLE, ENQ_SENT):
            self.commands_seen.append(b)
            self.send(codec.EOT)
            self.state = COMMAND_WAIT
        elif b == codec.ENQ and self.state == COMMAND_WAIT:
            self.send(codec.ACK)
            self.state = COMMAND
            self._command.clear()

    def _command_byte(self, b: bytes) -> None:
        self._command += b
        if not self._command.endswith(b"|") and not self._command.endswith(codec.CR):
            return
        command = bytes(self._command)
        self._command.clear()
        self.commands_seen.append(command)
        now = self.meter_now()
        if command == codec.CMD_READ:
            self._pending_read = True
            self.send(codec.ACK)
        elif command in (codec.CMD_DATE, codec.CMD_TIME) and self._pending_read:
            self._pending_read = False
            value = now.strftime("%y%m%d") if command == codec.CMD_DATE else now.strftime("%H%M")
            self.send(b"D|" + value.encode() + b"|" + codec.CRLF + codec.ACK)
        else:
            self._pending_read = False
            self.send(codec.ACK)  # W| and its arguments: acknowledged, never applied
