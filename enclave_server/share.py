"""The share: the part of the enclave's memory the host may read and write.

Every path the host sends is hostile. It is resolved component by component
from the share's root with openat(2)-style calls (dir_fd + O_NOFOLLOW), so no
`..`, symlink or special file can lead outside; no operation follows a link,
and the host cannot create links, devices or fifos. The share is a tmpfs of
its own, sized below the enclave's memory, so a full share answers ENOSPC
instead of waking the OOM killer. Decrypted packages live elsewhere (see
jobs.py) and no path here can reach them.
"""

import contextlib
import errno
import hashlib
import os
import secrets
import stat
import threading

TOP_LEVEL = ("encrypted", "dataset", "model", "output")
JOB_DIRS = ("dataset", "model", "output")  # what a running job reads and writes: the host may not change them
MAX_PATH = 4096
MAX_NAME = 255
MAX_IO = 8 << 20  # one read or write moves at most this much; the wire frame limit is the real bound
MAX_HASH_READ = 1 << 20
PUT_TEMP_PREFIX = ".put-"  # put's temporary file beside its target, for microseconds (or until a crash)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_MODE_MASK = 0o777


def _fail(code: int, message: str) -> OSError:
    return OSError(code, message)


def _not_a_link(path: str) -> OSError:
    return _fail(errno.EPERM, f"{path} is a symbolic link: the share holds only files and directories")


def split_path(path: str) -> list[str]:
    """'/dataset/a.csv' -> ['dataset', 'a.csv']; refuses anything that is not a plain relative name chain."""
    if not isinstance(path, str) or len(path) > MAX_PATH or "\0" in path:
        raise _fail(errno.EINVAL, f"invalid path {path!r}")
    parts = [p for p in path.split("/") if p]
    for part in parts:
        if part in (".", ".."):
            raise _fail(errno.EPERM, f"path {path!r} uses '{part}': paths in the share are plain names from its root")
        if len(part.encode()) > MAX_NAME:
            raise _fail(errno.ENAMETOOLONG, f"name {part[:40]!r}... is longer than {MAX_NAME} bytes")
    return parts


class Share:
    """File operations confined to one directory. Methods take share paths ('/dataset/x') and raise OSError."""

    def __init__(self, root):
        self.root = os.fspath(root)
        self._held: tuple[str, tuple[int, int]] | None = None  # (job description, package (dev, inode))
        self._batch = threading.local()  # .folder: [parts, fd] of the folder a batch last resolved, or None
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        for name in TOP_LEVEL:
            os.makedirs(os.path.join(self.root, name), mode=0o755, exist_ok=True)

    # -- a running job's inputs and outputs

    def hold(self, job: str, package_fd: int) -> None:
        """Refuse host changes to /dataset, /model, /output and the package file (by inode, so a rename
        does not free it) until release(): the receipt binds what the job read and wrote, nothing else."""
        st = os.fstat(package_fd)
        self._held = (job, (st.st_dev, st.st_ino))

    def release(self) -> None:
        self._held = None

    # The checks read self._held once: the job's thread may release it meanwhile (a second read gave None).
    def _busy(self, job: str, what: str) -> OSError:
        return _fail(
            errno.EBUSY,
            f"{what} is in use by {job}: the host cannot change it until the job ends; wait for it or cancel it",
        )

    def _check_held(self, path: str) -> None:
        held = self._held
        if held is not None:
            parts = split_path(path)
            if parts and parts[0] in JOB_DIRS:
                raise self._busy(held[0], f"/{parts[0]}")

    def _check_held_file(self, fd: int, path: str) -> None:
        held = self._held
        if held is not None:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == held[1]:
                raise self._busy(held[0], f"{path} (the package the job runs)")

    # -- resolution

    @contextlib.contextmanager
    def batch_folder(self):
        """Within the block, on this thread, the folder the last path resolved to stays open: a batch of
        operations in one folder walks it from the root once, not once each (a small file's put cost three
        opens and closes of folders besides its own). rmdir and rename forget it, so no later path of the
        batch reaches a folder that an earlier operation removed or moved. A folder another connection
        renames meanwhile takes the batch's later files with it, as if they had come before the rename; one
        it removes refuses them (ENOENT)."""
        self._batch.folder = []
        try:
            yield
        finally:
            self._forget_folder()
            self._batch.folder = None

    def _forget_folder(self) -> None:
        folder = getattr(self._batch, "folder", None)
        if folder:
            os.close(folder.pop())
            folder.clear()

    def _open_dir(self, parts: list[str]) -> int:
        """An fd for the directory at parts, walked one component at a time without following links (or a copy
        of the batch's folder, if that is the one)."""
        folder = getattr(self._batch, "folder", None)
        if folder is None:
            return self._walk(parts)
        if folder and folder[0] == parts:
            return os.dup(folder[1])
        fd = self._walk(parts)
        self._forget_folder()
        folder += [list(parts), os.dup(fd)]
        return fd

    def _walk(self, parts: list[str]) -> int:
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for part in parts:
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as err:
                    if err.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise _fail(errno.ENOTDIR, f"'{part}' is not a directory in the share") from None
                    raise
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _parent(self, path: str) -> tuple[int, str]:
        parts = split_path(path)
        if not parts:
            raise _fail(errno.EPERM, "the share's root itself cannot be changed")
        return self._open_dir(parts[:-1]), parts[-1]

    def _check_top_level(self, path: str) -> None:
        parts = split_path(path)
        if len(parts) == 1 and parts[0] in TOP_LEVEL:
            raise _fail(errno.EPERM, f"/{parts[0]} is part of the share's layout and cannot be removed or renamed")

    # -- metadata

    @staticmethod
    def _stat_dict(st: os.stat_result) -> dict:
        return {
            "mode": st.st_mode,
            "size": st.st_size,
            "nlink": st.st_nlink,
            "mtime_ns": st.st_mtime_ns,
            "atime_ns": st.st_atime_ns,
            "ctime_ns": st.st_ctime_ns,
            "blocks": st.st_blocks,
        }

    def stat(self, path: str) -> dict:
        parts = split_path(path)
        if not parts:
            return self._stat_dict(os.stat(self.root))
        dirfd = self._open_dir(parts[:-1])
        try:
            st = os.stat(parts[-1], dir_fd=dirfd, follow_symlinks=False)
        finally:
            os.close(dirfd)
        return self._stat_dict(st)

    def listdir(self, path: str) -> list[dict]:
        """Entries with their stat, so one round trip serves `ls -l`."""
        fd = self._open_dir(split_path(path))
        try:
            out = []
            with os.scandir(fd) as entries:
                for entry in entries:
                    st = entry.stat(follow_symlinks=False)
                    out.append({"name": entry.name, **self._stat_dict(st)})
            return out
        finally:
            os.close(fd)

    def statfs(self) -> dict:
        st = os.statvfs(self.root)
        return {
            "bsize": st.f_bsize,
            "frsize": st.f_frsize,
            "blocks": st.f_blocks,
            "bfree": st.f_bfree,
            "bavail": st.f_bavail,
            "files": st.f_files,
            "ffree": st.f_ffree,
            "namemax": st.f_namemax,
        }

    # -- directories

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        self._check_held(path)
        dirfd, name = self._parent(path)
        try:
            os.mkdir(name, mode & _FILE_MODE_MASK, dir_fd=dirfd)
        finally:
            os.close(dirfd)

    def rmdir(self, path: str) -> None:
        self._forget_folder()
        self._check_top_level(path)
        self._check_held(path)
        dirfd, name = self._parent(path)
        try:
            os.rmdir(name, dir_fd=dirfd)
        finally:
            os.close(dirfd)

    def unlink(self, path: str) -> None:
        self._check_held(path)
        dirfd, name = self._parent(path)
        try:
            if stat.S_ISDIR(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
                raise _fail(errno.EISDIR, f"{path} is a directory: use rmdir")
            os.unlink(name, dir_fd=dirfd)
        finally:
            os.close(dirfd)

    def rename(self, old: str, new: str) -> None:
        self._forget_folder()
        self._check_top_level(old)
        self._check_top_level(new)
        self._check_held(old)
        self._check_held(new)
        old_dir, old_name = self._parent(old)
        try:
            new_dir, new_name = self._parent(new)
            try:
                os.rename(old_name, new_name, src_dir_fd=old_dir, dst_dir_fd=new_dir)
            finally:
                os.close(new_dir)
        finally:
            os.close(old_dir)

    # -- files

    def _open_in_parent(self, path: str, flags: int, mode: int = 0o600) -> int:
        """Open path's last component inside its confined parent: never through a link, never blocking on a
        fifo (O_NONBLOCK; callers check the type and make the descriptor blocking)."""
        dirfd, name = self._parent(path)
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode, dir_fd=dirfd)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise _not_a_link(path) from None
            raise
        finally:
            os.close(dirfd)

    def _open_existing(self, path: str, flags: int) -> int:
        fd = self._open_in_parent(path, flags)
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise _fail(errno.EPERM, f"{path} is not a regular file or directory")
            os.set_blocking(fd, True)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def create(self, path: str, mode: int = 0o644, exclusive: bool = False, data: bytes | None = None) -> dict:
        """Create a regular file, or empty an existing one (O_EXCL when exclusive); returns its stat.

        data, if given, is written from offset 0 in the same call: a small file costs one request.
        The file is created even if writing the data then fails (ENOSPC...), as a create and a write would."""
        if data is not None and len(data) > MAX_IO:
            raise _fail(errno.EINVAL, f"create takes at most {MAX_IO} bytes of data")
        self._check_held(path)
        # Emptied after the checks, not by O_TRUNC: the file may be the package a job is reading.
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else 0)
        fd = self._open_in_parent(path, flags, mode & _FILE_MODE_MASK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise _fail(errno.EPERM, f"{path} is not a regular file")
            self._check_held_file(fd, path)
            if not exclusive:
                os.ftruncate(fd, 0)
            if data:
                view = memoryview(data)
                done = 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], done)
            return self._stat_dict(os.fstat(fd))
        finally:
            os.close(fd)

    # Reads and writes are stateless (by path, no handles): nothing leaks when a
    # client vanishes, and resolving a path costs microseconds beside a 1 MiB copy.

    def _open_file(self, path: str, flags: int) -> int:
        fd = self._open_existing(path, flags)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            raise _fail(errno.EISDIR, f"{path} is a directory")
        return fd

    def read(self, path: str, offset: int, size: int) -> bytes:
        if size < 0 or offset < 0:
            raise _fail(errno.EINVAL, "negative offset or size")
        fd = self._open_file(path, os.O_RDONLY)
        try:
            return os.pread(fd, min(size, MAX_IO), offset)
        finally:
            os.close(fd)

    def write(self, path: str, offset: int, data: bytes) -> int:
        if offset < 0 or len(data) > MAX_IO:
            raise _fail(errno.EINVAL, f"writes take a non-negative offset and at most {MAX_IO} bytes")
        self._check_held(path)
        fd = self._open_file(path, os.O_WRONLY)
        try:
            self._check_held_file(fd, path)
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
            return done
        finally:
            os.close(fd)

    def truncate(self, path: str, size: int) -> None:
        if size < 0:
            raise _fail(errno.EINVAL, "negative size")
        self._check_held(path)
        fd = self._open_file(path, os.O_WRONLY)
        try:
            self._check_held_file(fd, path)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def chmod(self, path: str, mode: int) -> None:
        self._check_held(path)
        fd = self._open_existing(path, os.O_RDONLY)
        try:
            os.fchmod(fd, mode & _FILE_MODE_MASK)
        finally:
            os.close(fd)

    def utimens(self, path: str, atime_ns: int, mtime_ns: int) -> None:
        self._check_held(path)
        fd = self._open_existing(path, os.O_RDONLY)
        try:
            os.utime(fd, ns=(atime_ns, mtime_ns))
        finally:
            os.close(fd)

    def put(self, path: str, mode: int = 0o644, data: bytes = b"") -> int:
        """Replace (or create) the regular file at path with data, all or nothing: the bytes go to a temporary
        file beside it, renamed over path once complete. A full share or any other error leaves path as it was
        and no partial file. Returns the bytes written."""
        if len(data) > MAX_IO:
            raise _fail(errno.EINVAL, f"put takes at most {MAX_IO} bytes of data")
        self._check_held(path)
        dirfd, name = self._parent(path)
        try:
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None:
                if stat.S_ISDIR(st.st_mode):
                    raise _fail(errno.EISDIR, f"{path} is a directory")
                if not stat.S_ISREG(st.st_mode):
                    raise _fail(errno.EPERM, f"{path} is not a regular file")
                held = self._held
                if held is not None and (st.st_dev, st.st_ino) == held[1]:
                    raise self._busy(held[0], f"{path} (the package the job runs)")
            temp = PUT_TEMP_PREFIX + secrets.token_hex(8)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(temp, flags, mode & _FILE_MODE_MASK, dir_fd=dirfd)
            try:
                view = memoryview(data)
                done = 0
                while done < len(view):
                    done += os.pwrite(fd, view[done:], done)
                os.close(fd)
                fd = -1
                os.rename(temp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
            except BaseException:
                if fd >= 0:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(temp, dir_fd=dirfd)
                raise
            return len(data)
        finally:
            os.close(dirfd)

    def sha256(self, path: str) -> str:
        """The SHA-256 (hex) of the regular file at path."""
        fd = self._open_file(path, os.O_RDONLY)
        try:
            digest = hashlib.sha256()
            # A small file in one read of its size (and one more byte): no 1 MiB buffer per file.
            want = min(os.fstat(fd).st_size + 1, MAX_HASH_READ)
            while block := os.read(fd, want):
                digest.update(block)
                want = MAX_HASH_READ
            return digest.hexdigest()
        finally:
            os.close(fd)

    def open_package(self, path: str):
        """The regular file at path, opened once for reading (checked like every other path): the job runner
        reads the package's header and body through this one descriptor."""
        fd = self._open_existing(path, os.O_RDONLY)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise _fail(errno.EISDIR, f"{path} is not a regular file")
        return os.fdopen(fd, "rb")
