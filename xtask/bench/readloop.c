/*
 * readloop: the syscall-heavy workload of `cargo xtask bench`.
 *
 *   readloop FILE COUNT [read|mix]
 *
 * Reads FILE once to pull it into the page cache, then times COUNT reads of 4 KiB from it
 * (rewinding at the end of the file). Mode `read` (default) uses read(2) only; mode `mix` cycles
 * through read, pread64, readv, preadv and preadv2, so that every read-family probe sees events.
 * Prints one line: `reads=N wall_ns=W cpu_ns=C` (wall and CPU time of the timed loop only).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BS 4096

static long long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long cpu_ns(void)
{
	struct rusage ru;
	getrusage(RUSAGE_SELF, &ru);
	return ((long long)ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000LL +
	       ((long long)ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000LL;
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s FILE COUNT [read|mix]\n", argv[0]);
		return 2;
	}
	long long count = atoll(argv[2]);
	int mix = argc > 3 && strcmp(argv[3], "mix") == 0;
	int fd = open(argv[1], O_RDONLY);
	if (fd < 0) {
		perror("open");
		return 1;
	}
	off_t size = lseek(fd, 0, SEEK_END);
	if (size < BS) {
		fprintf(stderr, "%s: file smaller than %d bytes\n", argv[1], BS);
		return 1;
	}
	static char buf[BS] __attribute__((aligned(4096)));
	/* Warm the page cache. */
	lseek(fd, 0, SEEK_SET);
	while (read(fd, buf, BS) > 0)
		;
	lseek(fd, 0, SEEK_SET);

	off_t off = 0;
	struct iovec iov = { .iov_base = buf, .iov_len = BS };
	long long c0 = cpu_ns(), t0 = now_ns();
	for (long long i = 0; i < count; i++) {
		ssize_t n;
		if (off + BS > size) {
			off = 0;
			lseek(fd, 0, SEEK_SET);
		}
		switch (mix ? i % 5 : 0) {
		case 0:
			n = read(fd, buf, BS);
			break;
		case 1:
			n = pread(fd, buf, BS, off);
			lseek(fd, off + BS, SEEK_SET);
			break;
		case 2:
			n = readv(fd, &iov, 1);
			break;
		case 3:
			n = preadv(fd, &iov, 1, off);
			lseek(fd, off + BS, SEEK_SET);
			break;
		default:
			n = preadv2(fd, &iov, 1, off, 0);
			lseek(fd, off + BS, SEEK_SET);
			break;
		}
		if (n != BS) {
			fprintf(stderr, "short read at %lld: %zd\n", (long long)off, n);
			return 1;
		}
		off += BS;
	}
	long long t1 = now_ns(), c1 = cpu_ns();
	printf("reads=%lld wall_ns=%lld cpu_ns=%lld\n", count, t1 - t0, c1 - c0);
	return 0;
}
