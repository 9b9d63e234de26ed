"""The buffers a loader process fills for its trainer (alexnet_lib.parallel, proc_load.py)."""
import mmap
import os

import numpy as np


def map_buffer(fd, shape):
    """The shared-memory file `fd` mapped as a uint8 array of `shape`: (mmap, array)."""
    nbytes = int(np.prod(shape))
    mm = mmap.mmap(fd, nbytes)
    return mm, np.frombuffer(mm, np.uint8, nbytes).reshape(shape)


class SharedBuffers:
    """The `prefetch` buffers the loader fills: anonymous shared-memory files (memfd) passed to
    the loader as inherited file descriptors. For a GPU the trainer pins them (cudaHostRegister)
    and copies each taken batch into one of two device buffers on a stream of its own, behind
    the GPU work that last read that device buffer; the loader itself needs no CUDA. (The
    loader copying into the trainer's GPU buffers through CUDA IPC, behind interprocess events,
    made the trainer wait longer: BENCHMARKS.md.)"""

    def __init__(self, device, shape, prefetch):
        self.device, self.cuda = device, device.type == 'cuda'
        self.tensors, self.mmaps, self.fds, self.pinned = [], [], [], []
        self.stream = None
        try:
            self._open(shape, prefetch)
        except BaseException:
            self.close()
            raise

    def _open(self, shape, prefetch):
        import torch
        nbytes = int(np.prod(shape))
        for i in range(prefetch):
            fd = os.memfd_create(f'proc_load_buf{i}')
            self.fds.append(fd)
            os.ftruncate(fd, nbytes)
            mm, array = map_buffer(fd, shape)
            self.mmaps.append(mm)
            self.tensors.append(torch.from_numpy(array))
        if not self.cuda:
            return
        device = self.device
        with torch.cuda.device(device):
            self.on_device = [torch.empty(shape, dtype=torch.uint8, device=device)
                              for _ in range(2)]
            self.stream = torch.cuda.Stream(device)
            self.copied, self.read = ([torch.cuda.Event() for _ in range(2)] for _ in range(2))
        self.next_slot, self.slot_of = 0, {}
        self.cudart = torch.cuda.cudart()
        for t in self.tensors:
            rc = self.cudart.cudaHostRegister(t.data_ptr(), nbytes, 0)
            if int(rc) != 0:
                raise RuntimeError(f"cudaHostRegister of a {nbytes}-byte loader buffer failed: "
                                   f"{rc}")
            self.pinned.append(t.data_ptr())

    def boot(self):
        """What the loader's start-up line says of them."""
        return {'buffers': self.fds}

    def close_fds(self):
        """Once the loader has its own copies of the files (the mappings stay)."""
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def take(self, buf, rows):
        """The first `rows` images of buffer `buf`, which the loader has filled; on a GPU
        their copy on the device, which the current stream waits for."""
        if not self.cuda:
            return self.tensors[buf][:rows]
        import torch
        slot, self.next_slot = self.next_slot, 1 - self.next_slot
        self.slot_of[buf] = slot
        out = self.on_device[slot][:rows]
        self.stream.wait_event(self.read[slot])     # the work that last read this slot
        with torch.cuda.stream(self.stream):
            out.copy_(self.tensors[buf][:rows], non_blocking=True)
            self.copied[slot].record(self.stream)
        torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        return out

    def give_back(self, buf):
        """The loader may refill `buf` (on a GPU once its copy is done: a wait of the host,
        short, as the work queued since needed that copy first)."""
        if self.cuda:
            import torch
            slot = self.slot_of.pop(buf)
            self.read[slot].record(torch.cuda.current_stream(self.device))
            self.copied[slot].synchronize()

    def close(self):
        self.close_fds()
        if self.stream is not None:
            self.stream.synchronize()
        if self.pinned:
            for ptr in self.pinned:
                self.cudart.cudaHostUnregister(ptr)
            self.pinned = []
        self.tensors = []
        for mm in self.mmaps:
            try:
                mm.close()
            except BufferError:   # a consumer still holds a tensor: freed when it is dropped
                pass
        self.mmaps = []
