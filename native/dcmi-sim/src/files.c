/* File plumbing: bounded whole-file reads, atomic replacement, line and token splitting. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "sim.h"

int sim_read_file(const char *path, char **data, size_t *len)
{
    /* O_NONBLOCK: opening a FIFO someone put in the directory must not wait for a writer. */
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK);
    if (fd < 0) {
        return -errno;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int error = errno;
        close(fd);
        return -error;
    }
    /* Only regular files: a FIFO or device put in the directory must not block or stream. */
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return -EINVAL;
    }
    if (st.st_size < 0 || (unsigned long long)st.st_size > SIM_MAX_FILE_BYTES) {
        close(fd);
        return -EFBIG;
    }
    size_t capacity = (size_t)st.st_size + 1;
    char *buffer = malloc(capacity + 1);
    if (buffer == NULL) {
        close(fd);
        return -ENOMEM;
    }
    size_t used = 0;
    /* Read until EOF or one byte past the size seen: a file that grew since fstat is read up to
     * that bound and then judged by the parser like any other content. */
    while (used < capacity) {
        ssize_t got = read(fd, buffer + used, capacity - used);
        if (got < 0) {
            if (errno == EINTR) {
                continue;
            }
            int error = errno;
            free(buffer);
            close(fd);
            return -error;
        }
        if (got == 0) {
            break;
        }
        used += (size_t)got;
    }
    close(fd);
    buffer[used] = '\0';
    *data = buffer;
    *len = used;
    return 0;
}

static int write_all(int fd, const char *data, size_t len)
{
    while (len > 0) {
        ssize_t done = write(fd, data, len);
        if (done < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -errno;
        }
        data += done;
        len -= (size_t)done;
    }
    return 0;
}

/* A reader sees the old file or the new one, never a mix, and a writer killed at any point
 * leaves the old file in place: rename(2) replaces the name atomically. Callers hold the state
 * lock, so a leftover temp file belongs to a writer that died. */
int sim_write_file_atomic(const char *path, const char *data, size_t len, int sync)
{
    char tmp[PATH_MAX + 32];
    int n = snprintf(tmp, sizeof tmp, "%s.tmp", path);
    if (n < 0 || (size_t)n >= sizeof tmp) {
        return -ENAMETOOLONG;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0 && errno == EEXIST) {
        unlink(tmp);
        fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    }
    if (fd < 0) {
        return -errno;
    }
    int error = write_all(fd, data, len);
    /* fdatasync flushes the data and size a rename needs to publish a complete file. */
    if (error == 0 && sync && fdatasync(fd) != 0) {
        error = -errno;
    }
    if (close(fd) != 0 && error == 0) {
        error = -errno;
    }
    if (error == 0 && rename(tmp, path) != 0) {
        error = -errno;
    }
    if (error != 0) {
        unlink(tmp);
    }
    return error;
}

void sim_for_each_line(const char *text, size_t len, sim_line_fn fn, void *ctx)
{
    size_t start = 0;
    while (start < len) {
        const char *newline = memchr(text + start, '\n', len - start);
        size_t line_len = newline == NULL ? len - start : (size_t)(newline - (text + start));
        if (fn(text + start, line_len, ctx) != 0) {
            return;
        }
        start += line_len + 1;
    }
}

int sim_tokenize(const char *line, size_t len, char *buf, size_t buf_len, char **tokens, int max)
{
    const char *hash = memchr(line, '#', len);
    if (hash != NULL) {
        len = (size_t)(hash - line);
    }
    if (len >= buf_len || memchr(line, '\0', len) != NULL) {
        return -1;
    }
    memcpy(buf, line, len);
    buf[len] = '\0';
    int count = 0;
    char *p = buf;
    for (;;) {
        while (*p == ' ' || *p == '\t' || *p == '\r') {
            p++;
        }
        if (*p == '\0') {
            return count;
        }
        if (count == max) {
            return -1;
        }
        tokens[count++] = p;
        while (*p != '\0' && *p != ' ' && *p != '\t' && *p != '\r') {
            p++;
        }
        if (*p != '\0') {
            *p++ = '\0';
        }
    }
}

int sim_parse_u64(const char *s, unsigned long long max, unsigned long long *out)
{
    if (*s == '\0' || strlen(s) > 20) {
        return -1;
    }
    unsigned long long value = 0;
    for (const char *p = s; *p != '\0'; p++) {
        if (*p < '0' || *p > '9') {
            return -1;
        }
        unsigned int digit = (unsigned int)(*p - '0');
        if (digit > max || value > (max - digit) / 10) {
            return -1;
        }
        value = value * 10 + digit;
    }
    *out = value;
    return 0;
}

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

int sim_parse_u64_any(const char *s, unsigned long long max, unsigned long long *out)
{
    if (s[0] != '0' || (s[1] != 'x' && s[1] != 'X')) {
        return sim_parse_u64(s, max, out);
    }
    const char *digits = s + 2;
    if (*digits == '\0' || strlen(digits) > 16) {
        return -1;
    }
    unsigned long long value = 0;
    for (const char *p = digits; *p != '\0'; p++) {
        int digit = hex_digit(*p);
        if (digit < 0) {
            return -1;
        }
        value = (value << 4) | (unsigned int)digit;
    }
    if (value > max) {
        return -1;
    }
    *out = value;
    return 0;
}
