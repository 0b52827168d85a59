/*
 * lossyfs: a FUSE file system that forgets, at a power cut, what a real disk would forget.
 *
 * kill -9 and cgroup.kill keep the kernel's page cache: every write a process made reaches
 * the disk later. A power cut does not: only what was fsynced is there after the reboot.
 * lossyfs shows a backing directory through a mount point and keeps every change in this
 * process's memory until it is made durable, so that killing this process is the cut and
 * the backing directory then holds exactly what a rebooted machine would find.
 *
 * The model (tests/harness/lossy.py and docs/store.md say the same):
 *   - One flat directory (the queue's folder): regular files only, no subdirectories, no
 *     hard or symbolic links, no special files (each is refused with EPERM).
 *   - Data: write and truncate change the file's content in memory only. fsync and
 *     fdatasync of that file write its content (the ranges written since, and its size)
 *     to the backing file.
 *   - Names: create, rename and unlink change the directory in memory only. They reach
 *     the backing directory when the directory is fsynced (all of them), or, for the one
 *     file, when that file is fsynced: its current name then points at it on disk (as on
 *     ext4, whose fsync of a new file commits the journal holding its directory entry). An
 *     unlink is durable only when the directory is fsynced. A file created and never
 *     fsynced, nor its directory, is gone after the cut; one whose directory was fsynced
 *     but not itself is there, empty (or with what was fsynced before).
 *     With LOSSYFS_STRICT_NAMES set, as POSIX allows: a file's fsync makes no name durable,
 *     only the folder's does, and the data of a file never named on disk stays pending
 *     until the folder's fsync and the file's next fsync (stricter than any real disk).
 *   - mmap (SQLite's -shm) goes through the page cache into write, so into memory: the
 *     -shm file is never fsynced, and SQLite rebuilds it.
 *   - Locks (fcntl, flock) are the kernel's own, local to this machine.
 * A cut at an exact moment: with LOSSYFS_CUT_AT_WRITE=N in its environment, lossyfs takes the
 * Nth write (into memory, as the page cache would) and then the power is gone: it prints
 * "cut at write N", and every request after it fails with EIO, so nothing more reaches the
 * disk or the memory, whatever the processes on the mount still try (kill them, then cut).
 * The cut is SIGTERM (or SIGINT): the loop stops between two requests, nothing pending is
 * written, the mount is taken down, and stdout says what the cut threw away (a line per
 * file: report_dropped). SIGKILL cuts too; then unmount with `fusermount3 -u -z`. A request
 * is never half applied by SIGTERM.
 *
 * Usage: lossyfs BACKING MOUNTPOINT [FUSE options]   (runs in the foreground, one thread)
 * Build: gcc -O2 -Wall -o lossyfs lossyfs.c $(pkg-config --cflags --libs fuse3)
 */
#define FUSE_USE_VERSION 31
#define _GNU_SOURCE

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define MAX_NAME 255
#define MAX_FILE_SIZE ((off_t)1 << 31) /* 2 GiB: a queue test never comes near */
#define MAX_RANGES 256

struct range { off_t start, end; };

struct node {
    uint64_t ino;
    char *name;        /* its name in the mount (NULL once unlinked or replaced) */
    char *disk_name;   /* its name in the backing directory (NULL: not on disk) */
    char *data;        /* its whole current content */
    off_t size, capacity;
    struct range dirty[MAX_RANGES];
    int ndirty;
    int size_dirty;    /* truncated since the last fsync */
    int opens;
    mode_t mode;
    struct timespec mtime, ctime;
    struct node *next;
};

static struct node *nodes;
static char *backing;
static int backing_fd = -1;
static uint64_t next_ino = 2;
static struct timespec root_mtime;
static long long cut_at_write, writes_seen;
static int powered_off;  /* past the cut at a write: every request fails */
static int strict_names; /* LOSSYFS_STRICT_NAMES: only a folder fsync makes names durable */

#define POWER() do { if (powered_off) return -EIO; } while (0)

static void now(struct timespec *ts) { clock_gettime(CLOCK_REALTIME, ts); }

static struct node *by_name(const char *name) {
    for (struct node *n = nodes; n; n = n->next)
        if (n->name && strcmp(n->name, name) == 0) return n;
    return NULL;
}

static struct node *by_disk_name(const char *name) {
    for (struct node *n = nodes; n; n = n->next)
        if (n->disk_name && strcmp(n->disk_name, name) == 0) return n;
    return NULL;
}

/* "/queue.db" -> "queue.db"; NULL for the root, a nested path or an overlong name */
static const char *leaf(const char *path, int *is_root) {
    *is_root = 0;
    if (path[0] != '/') return NULL;
    path++;
    if (*path == '\0') { *is_root = 1; return NULL; }
    if (strchr(path, '/') || strlen(path) > MAX_NAME) return NULL;
    return path;
}

static struct node *node_of(const char *path, struct fuse_file_info *fi) {
    if (fi && fi->fh) return (struct node *)(uintptr_t)fi->fh;
    int root;
    const char *name = path ? leaf(path, &root) : NULL;
    return name ? by_name(name) : NULL;
}

static void forget_if_unused(struct node *n) {
    if (n->name || n->disk_name || n->opens > 0) return;
    for (struct node **p = &nodes; *p; p = &(*p)->next)
        if (*p == n) { *p = n->next; break; }
    free(n->data);
    free(n);
}

static int reserve(struct node *n, off_t size) {
    if (size > MAX_FILE_SIZE) return -EFBIG;
    if (size <= n->capacity) return 0;
    off_t cap = n->capacity ? n->capacity : 4096;
    while (cap < size) cap *= 2;
    char *data = realloc(n->data, (size_t)cap);
    if (!data) return -ENOMEM;
    n->data = data;
    n->capacity = cap;
    return 0;
}

static void mark_dirty(struct node *n, off_t start, off_t end) {
    for (int i = 0; i < n->ndirty; i++) {
        struct range *r = &n->dirty[i];
        if (start <= r->end && end >= r->start) {  /* overlaps or touches: widen it */
            if (start < r->start) r->start = start;
            if (end > r->end) r->end = end;
            return;
        }
    }
    if (n->ndirty == MAX_RANGES) {  /* too many: one range over all of them */
        for (int i = 0; i < n->ndirty; i++) {
            if (n->dirty[i].start < start) start = n->dirty[i].start;
            if (n->dirty[i].end > end) end = n->dirty[i].end;
        }
        n->ndirty = 0;
    }
    n->dirty[n->ndirty++] = (struct range){start, end};
}

static struct node *new_node(const char *name, mode_t mode) {
    struct node *n = calloc(1, sizeof *n);
    if (!n) return NULL;
    n->name = strdup(name);
    if (!n->name) { free(n); return NULL; }
    n->ino = next_ino++;
    n->mode = S_IFREG | (mode & 07777);
    now(&n->mtime);
    n->ctime = n->mtime;
    n->next = nodes;
    nodes = n;
    return n;
}

/* ---- the disk: the backing directory changes only here ---- */

/* Make `n`'s current name its name on disk (a create or rename reaching the disk). */
static int settle_name(struct node *n, const char *tmp_prefix) {
    if (!n->name || (n->disk_name && strcmp(n->disk_name, n->name) == 0)) return 0;
    const char *target = n->name;
    char tmp[MAX_NAME + 64];
    if (tmp_prefix) {  /* a directory fsync renames through a private name, in two passes */
        snprintf(tmp, sizeof tmp, "%s%llu", tmp_prefix, (unsigned long long)n->ino);
        target = tmp;
    }
    struct node *owner = by_disk_name(target);
    if (owner && owner != n) {  /* the old file of that name loses it on disk */
        free(owner->disk_name);
        owner->disk_name = NULL;
        forget_if_unused(owner);
    }
    if (n->disk_name) {
        if (renameat(backing_fd, n->disk_name, backing_fd, target) != 0) return -errno;
        free(n->disk_name);
    } else {
        int fd = openat(backing_fd, target, O_WRONLY | O_CREAT | O_TRUNC, n->mode & 07777);
        if (fd < 0) return -errno;
        close(fd);
    }
    n->disk_name = strdup(target);
    return n->disk_name ? 0 : -ENOMEM;
}

/* Write the content changed since the last fsync to the file's name on disk. */
static int settle_data(struct node *n) {
    if (!n->disk_name) return 0;
    int fd = openat(backing_fd, n->disk_name, O_WRONLY);
    if (fd < 0) return -errno;
    int err = 0;
    for (int i = 0; i < n->ndirty && !err; i++) {
        off_t start = n->dirty[i].start, end = n->dirty[i].end;
        if (end > n->size) end = n->size;
        while (start < end) {
            ssize_t done = pwrite(fd, n->data + start, (size_t)(end - start), start);
            if (done < 0) { err = -errno; break; }
            start += done;
        }
    }
    if (!err && ftruncate(fd, n->size) != 0) err = -errno;
    close(fd);
    if (!err) { n->ndirty = 0; n->size_dirty = 0; }
    return err;
}

static int fsync_file(struct node *n) {
    int err = strict_names ? 0 : settle_name(n, NULL);
    return err ? err : settle_data(n);  /* strict and never named on disk: stays pending */
}

/* Every create, rename and unlink of the directory reaches the disk (data does not). */
static int fsync_directory(void) {
    int err;
    for (struct node *n = nodes; n; n = n->next)
        if (n->name && (!n->disk_name || strcmp(n->disk_name, n->name) != 0))
            if ((err = settle_name(n, ".lossyfs-rename-")) != 0) return err;
    for (struct node *n = nodes; n; n = n->next)
        if ((err = settle_name(n, NULL)) != 0) return err;
    for (struct node *n = nodes, *next; n; n = next) {
        next = n->next;
        if (!n->name && n->disk_name) {  /* unlinked in the mount: now on disk too */
            if (unlinkat(backing_fd, n->disk_name, 0) != 0 && errno != ENOENT) return -errno;
            free(n->disk_name);
            n->disk_name = NULL;
            forget_if_unused(n);
        }
    }
    return 0;
}

/* ---- start: the mount shows what the disk holds ---- */

static int load(void) {
    DIR *dir = opendir(backing);
    if (!dir) { perror(backing); return -1; }
    struct dirent *entry;
    while ((entry = readdir(dir))) {
        if (strcmp(entry->d_name, ".") == 0 || strcmp(entry->d_name, "..") == 0) continue;
        struct stat st;
        if (fstatat(backing_fd, entry->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) continue;
        if (!S_ISREG(st.st_mode)) {
            fprintf(stderr, "lossyfs: %s/%s is not a regular file\n", backing, entry->d_name);
            closedir(dir);
            return -1;
        }
        struct node *n = new_node(entry->d_name, st.st_mode);
        if (!n || !(n->disk_name = strdup(entry->d_name)) || reserve(n, st.st_size) != 0) {
            closedir(dir);
            return -1;
        }
        int fd = openat(backing_fd, entry->d_name, O_RDONLY);
        off_t got = 0;
        while (fd >= 0 && got < st.st_size) {
            ssize_t r = pread(fd, n->data + got, (size_t)(st.st_size - got), got);
            if (r <= 0) break;
            got += r;
        }
        if (fd >= 0) close(fd);
        if (got != st.st_size) {
            fprintf(stderr, "lossyfs: cannot read %s/%s\n", backing, entry->d_name);
            closedir(dir);
            return -1;
        }
        n->size = st.st_size;
        n->mtime = st.st_mtim;
        n->ctime = st.st_ctim;
    }
    closedir(dir);
    now(&root_mtime);
    return 0;
}

/* ---- the FUSE operations: the mount's view, in memory ---- */

static void *lossy_init(struct fuse_conn_info *conn, struct fuse_config *cfg) {
    (void)conn;
    cfg->use_ino = 1;          /* SQLite tells files apart by st_ino */
    cfg->nullpath_ok = 1;
    cfg->hard_remove = 1;      /* an unlinked open file stays ours, not .fuse_hidden* */
    cfg->entry_timeout = 0;
    cfg->attr_timeout = 0;
    cfg->negative_timeout = 0;
    cfg->direct_io = 0;        /* the page cache, so that mmap (the -shm) works */
    cfg->kernel_cache = 0;
    return NULL;
}

static void fill(struct stat *st, struct node *n) {
    memset(st, 0, sizeof *st);
    st->st_ino = n->ino;
    st->st_mode = n->mode;
    st->st_nlink = n->name ? 1 : 0;
    st->st_uid = getuid();
    st->st_gid = getgid();
    st->st_size = n->size;
    st->st_blksize = 4096;
    st->st_blocks = (n->size + 511) / 512;
    st->st_mtim = n->mtime;
    st->st_atim = n->mtime;
    st->st_ctim = n->ctime;
}

static int lossy_getattr(const char *path, struct stat *st, struct fuse_file_info *fi) {
    POWER();
    int root = 0;
    if (!(fi && fi->fh) && path) {
        leaf(path, &root);
        if (root) {
            memset(st, 0, sizeof *st);
            st->st_ino = 1;
            st->st_mode = S_IFDIR | 0755;
            st->st_nlink = 2;
            st->st_uid = getuid();
            st->st_gid = getgid();
            st->st_mtim = st->st_ctim = st->st_atim = root_mtime;
            return 0;
        }
    }
    struct node *n = node_of(path, fi);
    if (!n) return -ENOENT;
    fill(st, n);
    return 0;
}

static int lossy_readdir(const char *path, void *buf, fuse_fill_dir_t filler, off_t offset,
                         struct fuse_file_info *fi, enum fuse_readdir_flags flags) {
    POWER();
    (void)path; (void)offset; (void)fi; (void)flags;
    filler(buf, ".", NULL, 0, 0);
    filler(buf, "..", NULL, 0, 0);
    for (struct node *n = nodes; n; n = n->next) {
        if (!n->name) continue;
        struct stat st;
        fill(&st, n);
        filler(buf, n->name, &st, 0, 0);
    }
    return 0;
}

static int lossy_open(const char *path, struct fuse_file_info *fi) {
    POWER();
    struct node *n = node_of(path, NULL);
    if (!n) return -ENOENT;
    if (fi->flags & O_TRUNC && n->size) {
        n->size = 0;
        n->size_dirty = 1;
        now(&n->mtime);
    }
    n->opens++;
    fi->fh = (uintptr_t)n;
    return 0;
}

static int lossy_create(const char *path, mode_t mode, struct fuse_file_info *fi) {
    POWER();
    int root;
    const char *name = leaf(path, &root);
    if (!name) return root ? -EISDIR : -EPERM;
    if (!S_ISREG(mode | S_IFREG)) return -EPERM;
    struct node *n = by_name(name);
    if (n) return lossy_open(path, fi);
    if (!(n = new_node(name, mode))) return -ENOMEM;
    now(&root_mtime);
    n->opens++;
    fi->fh = (uintptr_t)n;
    return 0;
}

static int lossy_read(const char *path, char *buf, size_t size, off_t offset,
                      struct fuse_file_info *fi) {
    POWER();
    struct node *n = node_of(path, fi);
    if (!n) return -ENOENT;
    if (offset >= n->size) return 0;
    if ((off_t)size > n->size - offset) size = (size_t)(n->size - offset);
    memcpy(buf, n->data + offset, size);
    return (int)size;
}

static int lossy_write(const char *path, const char *buf, size_t size, off_t offset,
                       struct fuse_file_info *fi) {
    POWER();
    struct node *n = node_of(path, fi);
    if (!n) return -ENOENT;
    if (fi && (fi->flags & O_APPEND)) offset = n->size;
    off_t end = offset + (off_t)size;
    int err = reserve(n, end);
    if (err) return err;
    if (offset > n->size) {  /* a hole reads as zeros */
        memset(n->data + n->size, 0, (size_t)(offset - n->size));
        mark_dirty(n, n->size, offset);
    }
    memcpy(n->data + offset, buf, size);
    if (end > n->size) n->size = end;
    mark_dirty(n, offset, end);
    now(&n->mtime);
    if (cut_at_write && ++writes_seen == cut_at_write) {
        powered_off = 1;
        printf("cut at write %lld\n", writes_seen);
        fflush(stdout);
    }
    return (int)size;
}

static int lossy_truncate(const char *path, off_t size, struct fuse_file_info *fi) {
    POWER();
    struct node *n = node_of(path, fi);
    if (!n) return -ENOENT;
    if (size < 0) return -EINVAL;
    int err = reserve(n, size);
    if (err) return err;
    if (size > n->size) {
        memset(n->data + n->size, 0, (size_t)(size - n->size));
        mark_dirty(n, n->size, size);
    }
    n->size = size;
    n->size_dirty = 1;
    now(&n->mtime);
    return 0;
}

static int lossy_fsync(const char *path, int datasync, struct fuse_file_info *fi) {
    POWER();
    (void)datasync;  /* fdatasync: the same (a size change is data here) */
    struct node *n = node_of(path, fi);
    return n ? fsync_file(n) : -ENOENT;
}

static int lossy_fsyncdir(const char *path, int datasync, struct fuse_file_info *fi) {
    POWER();
    (void)path; (void)datasync; (void)fi;
    return fsync_directory();
}

static int lossy_release(const char *path, struct fuse_file_info *fi) {
    (void)path;
    struct node *n = (struct node *)(uintptr_t)fi->fh;
    if (n) {
        n->opens--;
        forget_if_unused(n);
    }
    return 0;
}

static int lossy_unlink(const char *path) {
    POWER();
    struct node *n = node_of(path, NULL);
    if (!n) return -ENOENT;
    free(n->name);
    n->name = NULL;
    now(&root_mtime);
    forget_if_unused(n);
    return 0;
}

static int lossy_rename(const char *from, const char *to, unsigned int flags) {
    POWER();
    if (flags) return -EINVAL;
    int root;
    const char *to_name = leaf(to, &root);
    if (!to_name) return -EPERM;
    struct node *n = node_of(from, NULL);
    if (!n) return -ENOENT;
    struct node *old = by_name(to_name);
    if (old == n) return 0;
    char *name = strdup(to_name);
    if (!name) return -ENOMEM;
    if (old) {
        free(old->name);
        old->name = NULL;
        forget_if_unused(old);
    }
    free(n->name);
    n->name = name;
    now(&n->ctime);
    now(&root_mtime);
    return 0;
}

static int lossy_chmod(const char *path, mode_t mode, struct fuse_file_info *fi) {
    POWER();
    struct node *n = node_of(path, fi);
    if (!n) return -ENOENT;
    n->mode = (n->mode & S_IFMT) | (mode & 07777);  /* kept in memory only */
    return 0;
}

static int lossy_chown(const char *path, uid_t uid, gid_t gid, struct fuse_file_info *fi) {
    POWER();
    (void)uid; (void)gid;
    return node_of(path, fi) ? 0 : -ENOENT;
}

static int lossy_utimens(const char *path, const struct timespec tv[2],
                         struct fuse_file_info *fi) {
    POWER();
    struct node *n = node_of(path, fi);
    if (!n) return -ENOENT;
    if (tv[1].tv_nsec == UTIME_NOW) now(&n->mtime);
    else if (tv[1].tv_nsec != UTIME_OMIT) n->mtime = tv[1];
    return 0;
}

static int lossy_statfs(const char *path, struct statvfs *st) {
    POWER();
    (void)path;
    return fstatvfs(backing_fd, st) == 0 ? 0 : -errno;
}

static int lossy_access(const char *path, int mask) {
    POWER();
    (void)mask;
    int root;
    leaf(path, &root);
    return root || node_of(path, NULL) ? 0 : -ENOENT;
}

static int lossy_refuse(const char *path, mode_t mode) { (void)path; (void)mode; return -EPERM; }
static int lossy_refuse_link(const char *a, const char *b) { (void)a; (void)b; return -EPERM; }
static int lossy_refuse_node(const char *path, mode_t mode, dev_t dev) {
    (void)path; (void)mode; (void)dev;
    return -EPERM;
}

static const struct fuse_operations operations = {
    .init = lossy_init,
    .getattr = lossy_getattr,
    .readdir = lossy_readdir,
    .open = lossy_open,
    .create = lossy_create,
    .read = lossy_read,
    .write = lossy_write,
    .truncate = lossy_truncate,
    .fsync = lossy_fsync,
    .fsyncdir = lossy_fsyncdir,
    .release = lossy_release,
    .unlink = lossy_unlink,
    .rename = lossy_rename,
    .chmod = lossy_chmod,
    .chown = lossy_chown,
    .utimens = lossy_utimens,
    .statfs = lossy_statfs,
    .access = lossy_access,
    .mkdir = lossy_refuse,
    .mknod = lossy_refuse_node,
    .symlink = lossy_refuse_link,
    .link = lossy_refuse_link,
};

/* What the cut threw away: one line per file with anything not durable, printed as
 * lossyfs stops: "dropped NAME BYTES SIZE ENTRY" (bytes changed and not fsynced; 1 if its
 * size was changed and not fsynced; 1 if its create, rename or unlink was not durable). */
static void report_dropped(void) {
    for (struct node *n = nodes; n; n = n->next) {
        long long bytes = 0;
        for (int i = 0; i < n->ndirty; i++) bytes += n->dirty[i].end - n->dirty[i].start;
        int entry = (n->name && (!n->disk_name || strcmp(n->name, n->disk_name) != 0)) ||
                    (!n->name && n->disk_name);
        if (bytes || n->size_dirty || entry)
            printf("dropped %s %lld %d %d\n", n->name ? n->name : n->disk_name, bytes,
                   n->size_dirty, entry);
    }
    fflush(stdout);
}

int main(int argc, char *argv[]) {
    if (argc < 3) {
        fprintf(stderr, "usage: lossyfs BACKING MOUNTPOINT [FUSE options]\n");
        return 2;
    }
    backing = realpath(argv[1], NULL);
    if (!backing || (backing_fd = open(backing, O_RDONLY | O_DIRECTORY)) < 0) {
        perror(argv[1]);
        return 2;
    }
    if (load() != 0) return 2;
    const char *at = getenv("LOSSYFS_CUT_AT_WRITE");
    if (at) cut_at_write = atoll(at);
    strict_names = getenv("LOSSYFS_STRICT_NAMES") != NULL;
    /* fuse_main's argv: program, mount point, foreground, one thread, then the caller's */
    char **args = calloc((size_t)argc + 3, sizeof *args);
    int count = 0;
    args[count++] = argv[0];
    args[count++] = argv[2];
    args[count++] = "-f";
    args[count++] = "-s";
    for (int i = 3; i < argc; i++) args[count++] = argv[i];
    int status = fuse_main(count, args, &operations, NULL);
    report_dropped();
    return status;
}
