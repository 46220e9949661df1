"""Contour (ASTM E1381/E1394) simulator, as in reference B.4/B.5/B.7.

Host EOT (in any state) -> meter ENQ; host ACK -> frames H, P, R..., L (one record per frame,
ETB except ETX on L), each sent again on NAK (six NAKs of one frame abort with EOT); after the
final ACK the meter sends EOT. Host NAK while idle -> EOT, then host ENQ -> ACK: remote command
mode (``R|`` ``D|`` / ``R|`` ``T|`` read the clock; ``W|`` is logged and ignored).
"""

from __future__ import annotations

from typing import ClassVar

from drivers import contour_astm as codec
from drivers.simulators.base import Simulator

PRODUCT = "Bayer7410"
VERSIONS = "01.10\\01.05\\10.03"
CONFIG = "A=1^C=03^G=en^I=0200^R=0^S=01^U=0^V=10600^X=054070054054180154154254054154^Y=360126099054120054252099^Z=1"

IDLE, ENQ_SENT, TRANSFER, COMMAND_WAIT, COMMAND = "idle", "enq", "transfer", "command-wait", "command"


class ContourSimulator(Simulator):
    PROTOCOL: ClassVar[str] = codec.PROTOCOL
    DEFAULT_SERIAL: ClassVar[str] = "7410-1234567"

    def setup(self) -> None:
        self.state = IDLE
        self._frames: list[tuple[str, bool]] = []  # (record text, is a result)
        self._index = 0
        self._naks = 0
        self._command = bytearray()
        self._pending_read = False

    def _records(self) -> list[tuple[str, bool]]:
        clock = self.meter_now().strftime("%Y%m%d%H%M%S")
        header = f"H|\\^&||sim001|{PRODUCT}^{VERSIONS}^{self.serial}^00000|{CONFIG}|{len(self.records)}|||||P|1|{clock}"
        texts = [(header, False), ("P|1", False)]
        texts += [(codec.encode_result(i, r), True) for i, r in enumerate(self.records, start=1)]
        texts.append(("L|1||N", False))
        return texts

    def _send_frame(self) -> None:
        text = self._frames[self._index][0]
        final = self._index == len(self._frames) - 1
        frame = codec.encode_frame(codec.FIRST_FRAME + self._index, text, final=final)
        if self.mangler.bad_checksum():
            frame = frame[:-4] + (b"00" if frame[-4:-2] != b"00" else b"01") + codec.CRLF
        self.reply_delay()
        self.send(self.mangler.mangle(frame))

    def _advance(self) -> None:
        if self._frames[self._index][1]:
            self.records_sent += 1
        self._index += 1
        self._naks = 0
        if self._index == len(self._frames):
            self.send(codec.EOT)
            self.state = IDLE
            return
        if self._frames[self._index][1]:
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
