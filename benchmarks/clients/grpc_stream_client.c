/*
 * grpc_stream_client — a light gRPC server-streaming load client for the stream benchmark (libnghttp2, one thread,
 * poll()). It opens Subscribe streams over a few HTTP/2 connections and timestamps every message it receives, so the
 * benchmark measures the stream service's fan-out without client processes written in Python competing with the
 * server for the same two cores (a subscriber is normally on another machine).
 *
 * Usage: grpc_stream_client HOST PORT PATH STREAMS_PER_CONNECTION PROBE_EVERY
 * Commands on stdin, one per line (answers on stdout, one line each, then "." on a line of its own):
 *   add N FILE   open N more streams; FILE holds N requests, each a 4-byte big-endian length + protobuf bytes
 *                (answer: "ok <streams>")
 *   reset        zero the counters and drop the latency samples (answer: "ok")
 *   stats        "stats subs=<n> snapped=<n> with_deltas=<n> finished=<n> errors=<n> msgs=<n> bytes=<n>
 *                 full_equiv=<n> delta_bytes=<n> deltas=<n>", then one "lat <bucket_seconds> <receive_unix_us>" line
 *                per Delta received (conflated = 0) on every PROBE_EVERY-th stream, then "err <text>" for the last error
 *   quit         close everything and exit (answer: "ok")
 * A message is a Snapshot when it is the stream's first, a Delta when it carries SubscribeResponse.delta; its size
 * is the gRPC message length. full_equiv adds the stream's first (snapshot) message size per Delta received:
 * the bytes the subscriber would have received as snapshots of its own filter.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
  int64_t bucket;
  int64_t recv_us;
} lat_t;

typedef struct stream_s {
  int32_t id;
  int conn;
  uint8_t *req; /* gRPC-framed request */
  size_t req_len, req_off;
  uint8_t *buf; /* partial response message */
  size_t buf_len, buf_cap;
  uint64_t msgs;
  uint64_t first_size;
  uint64_t deltas;
  int snapped, finished, probe, grpc_status_bad;
} stream_t;

typedef struct {
  int fd;
  nghttp2_session *s;
  uint8_t *out; /* bytes nghttp2 produced that the socket did not take yet */
  size_t out_len, out_cap;
  int nstreams;
  int dead;
} conn_t;

static const char *g_host, *g_port, *g_path;
static char g_authority[256];
static int g_per_conn, g_probe_every;
static conn_t *g_conns;
static int g_nconns, g_capconns;
static stream_t **g_streams;
static size_t g_nstreams, g_capstreams;
static lat_t *g_lat;
static size_t g_nlat, g_caplat;
static uint64_t g_msgs, g_bytes, g_full_equiv, g_delta_bytes, g_deltas, g_errors;
static char g_last_error[512];

static int64_t now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void *xrealloc(void *p, size_t n) {
  void *q = realloc(p, n);
  if (!q) {
    fprintf(stderr, "out of memory\n");
    exit(2);
  }
  return q;
}

/* --- protobuf: just enough to read SubscribeResponse.delta.{bucket_time.seconds, conflated} ------------------ */

static int read_varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
  uint64_t r = 0;
  int shift = 0;
  while (*p < end && shift < 64) {
    uint8_t b = *(*p)++;
    r |= (uint64_t)(b & 0x7f) << shift;
    if (!(b & 0x80)) {
      *v = r;
      return 1;
    }
    shift += 7;
  }
  return 0;
}

/* Skips one field of wire type wt; returns 0 on malformed input. For wire type 2, sets sub and sublen. */
static int next_field(const uint8_t **p, const uint8_t *end, uint64_t *field, uint64_t *val, const uint8_t **sub,
                      uint64_t *sublen) {
  uint64_t tag;
  if (!read_varint(p, end, &tag)) return 0;
  *field = tag >> 3;
  switch (tag & 7) {
    case 0:
      return read_varint(p, end, val);
    case 1:
      if (end - *p < 8) return 0;
      *p += 8;
      return 1;
    case 5:
      if (end - *p < 4) return 0;
      *p += 4;
      return 1;
    case 2:
      if (!read_varint(p, end, sublen) || (uint64_t)(end - *p) < *sublen) return 0;
      *sub = *p;
      *p += *sublen;
      return 1;
    default:
      return 0;
  }
}

/* Returns 1 and the bucket seconds / conflated count when msg is a SubscribeResponse with a Delta. */
static int parse_delta(const uint8_t *msg, size_t len, int64_t *bucket, uint64_t *conflated) {
  const uint8_t *p = msg, *end = msg + len, *sub = NULL;
  uint64_t f, v = 0, sl = 0;
  while (p < end) {
    if (!next_field(&p, end, &f, &v, &sub, &sl)) return 0;
    if (f == 4) { /* delta */
      const uint8_t *q = sub, *qe = sub + sl, *s2 = NULL;
      uint64_t f2, v2 = 0, l2 = 0;
      *bucket = 0;
      *conflated = 0;
      while (q < qe) {
        if (!next_field(&q, qe, &f2, &v2, &s2, &l2)) return 0;
        if (f2 == 1) { /* bucket_time: Timestamp */
          const uint8_t *t = s2, *te = s2 + l2, *s3 = NULL;
          uint64_t f3, v3 = 0, l3 = 0;
          while (t < te) {
            if (!next_field(&t, te, &f3, &v3, &s3, &l3)) return 0;
            if (f3 == 1) *bucket = (int64_t)v3;
          }
        } else if (f2 == 4) {
          *conflated = v2;
        }
      }
      return 1;
    }
  }
  return 0;
}

static void on_message(stream_t *st, const uint8_t *msg, size_t len, int64_t t) {
  g_msgs++;
  g_bytes += len;
  st->msgs++;
  if (!st->snapped) {
    st->snapped = 1;
    st->first_size = len;
    return;
  }
  int64_t bucket;
  uint64_t conflated;
  if (parse_delta(msg, len, &bucket, &conflated)) {
    st->deltas++;
    g_deltas++;
    g_full_equiv += st->first_size;
    g_delta_bytes += len;
    if (st->probe && conflated == 0) {
      if (g_nlat == g_caplat) {
        g_caplat = g_caplat ? 2 * g_caplat : 4096;
        g_lat = xrealloc(g_lat, g_caplat * sizeof(lat_t));
      }
      g_lat[g_nlat].bucket = bucket;
      g_lat[g_nlat].recv_us = t;
      g_nlat++;
    }
  }
}

/* --- nghttp2 callbacks --------------------------------------------------------------------------------------- */

static ssize_t send_cb(nghttp2_session *s, const uint8_t *data, size_t len, int flags, void *u) {
  (void)s;
  (void)flags;
  conn_t *c = u;
  if (c->out_len == 0) {
    ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
    if (n >= 0 && (size_t)n == len) return n;
    if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) return NGHTTP2_ERR_CALLBACK_FAILURE;
    if (n < 0) n = 0;
    data += n;
    len -= (size_t)n;
    /* keep the rest */
    if (c->out_cap < len) {
      c->out_cap = len * 2;
      c->out = xrealloc(c->out, c->out_cap);
    }
    memcpy(c->out, data, len);
    c->out_len = len;
    return (ssize_t)len + n;
  }
  if (c->out_cap < c->out_len + len) {
    c->out_cap = (c->out_len + len) * 2;
    c->out = xrealloc(c->out, c->out_cap);
  }
  memcpy(c->out + c->out_len, data, len);
  c->out_len += len;
  return (ssize_t)len;
}

static int data_chunk_cb(nghttp2_session *s, uint8_t flags, int32_t sid, const uint8_t *data, size_t len, void *u) {
  (void)flags;
  (void)u;
  stream_t *st = nghttp2_session_get_stream_user_data(s, sid);
  if (!st) return 0;
  int64_t t = now_us();
  if (st->buf_cap < st->buf_len + len) {
    st->buf_cap = (st->buf_len + len) * 2;
    st->buf = xrealloc(st->buf, st->buf_cap);
  }
  memcpy(st->buf + st->buf_len, data, len);
  st->buf_len += len;
  size_t off = 0;
  while (st->buf_len - off >= 5) {
    uint32_t mlen = ((uint32_t)st->buf[off + 1] << 24) | ((uint32_t)st->buf[off + 2] << 16) |
                    ((uint32_t)st->buf[off + 3] << 8) | st->buf[off + 4];
    if (st->buf_len - off - 5 < mlen) break;
    on_message(st, st->buf + off + 5, mlen, t);
    off += 5 + mlen;
  }
  if (off) {
    memmove(st->buf, st->buf + off, st->buf_len - off);
    st->buf_len -= off;
  }
  return 0;
}

static int header_cb(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
                     const uint8_t *value, size_t valuelen, uint8_t flags, void *u) {
  (void)flags;
  (void)u;
  if (frame->hd.type != NGHTTP2_HEADERS) return 0;
  stream_t *st = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);
  if (!st) return 0;
  if (namelen == 11 && memcmp(name, "grpc-status", 11) == 0 && !(valuelen == 1 && value[0] == '0')) {
    st->grpc_status_bad = 1;
    snprintf(g_last_error, sizeof g_last_error, "grpc-status %.*s", (int)valuelen, value);
  }
  if (namelen == 12 && memcmp(name, "grpc-message", 12) == 0 && st->grpc_status_bad) {
    size_t n = strlen(g_last_error);
    snprintf(g_last_error + n, sizeof g_last_error - n, ": %.*s", (int)valuelen, value);
  }
  return 0;
}

static int stream_close_cb(nghttp2_session *s, int32_t sid, uint32_t error_code, void *u) {
  (void)u;
  stream_t *st = nghttp2_session_get_stream_user_data(s, sid);
  if (!st) return 0;
  st->finished = 1;
  if (error_code != 0 || st->grpc_status_bad) {
    g_errors++;
    if (!st->grpc_status_bad) snprintf(g_last_error, sizeof g_last_error, "stream reset, h2 error %u", error_code);
  }
  return 0;
}

static ssize_t req_read_cb(nghttp2_session *s, int32_t sid, uint8_t *buf, size_t len, uint32_t *flags,
                           nghttp2_data_source *src, void *u) {
  (void)s;
  (void)sid;
  (void)u;
  stream_t *st = src->ptr;
  size_t n = st->req_len - st->req_off;
  if (n > len) n = len;
  memcpy(buf, st->req + st->req_off, n);
  st->req_off += n;
  if (st->req_off == st->req_len) *flags |= NGHTTP2_DATA_FLAG_EOF;
  return (ssize_t)n;
}

/* --- connections and streams ---------------------------------------------------------------------------------- */

static int connect_to(void) {
  struct addrinfo hints = {0}, *res;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  if (getaddrinfo(g_host, g_port, &hints, &res) != 0) return -1;
  int fd = socket(res->ai_family, res->ai_socktype, res->ai_protocol);
  if (fd < 0 || connect(fd, res->ai_addr, res->ai_addrlen) != 0) {
    freeaddrinfo(res);
    if (fd >= 0) close(fd);
    return -1;
  }
  freeaddrinfo(res);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
  return fd;
}

static conn_t *new_conn(void) {
  if (g_nconns == g_capconns) {
    g_capconns = g_capconns ? 2 * g_capconns : 16;
    g_conns = xrealloc(g_conns, (size_t)g_capconns * sizeof(conn_t));
    /* session user data points into g_conns: re-point after a move */
    for (int i = 0; i < g_nconns; i++) nghttp2_session_set_user_data(g_conns[i].s, &g_conns[i]);
  }
  conn_t *c = &g_conns[g_nconns];
  memset(c, 0, sizeof *c);
  c->fd = connect_to();
  if (c->fd < 0) {
    fprintf(stderr, "connect %s:%s failed: %s\n", g_host, g_port, strerror(errno));
    exit(2);
  }
  nghttp2_session_callbacks *cb;
  nghttp2_session_callbacks_new(&cb);
  nghttp2_session_callbacks_set_send_callback(cb, send_cb);
  nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, data_chunk_cb);
  nghttp2_session_callbacks_set_on_header_callback(cb, header_cb);
  nghttp2_session_callbacks_set_on_stream_close_callback(cb, stream_close_cb);
  nghttp2_option *opt;
  nghttp2_option_new(&opt);
  nghttp2_option_set_peer_max_concurrent_streams(opt, 100000);
  nghttp2_session_client_new2(&c->s, cb, c, opt);
  nghttp2_option_del(opt);
  nghttp2_session_callbacks_del(cb);
  nghttp2_settings_entry iv[] = {{NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 100000},
                                 {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, 1 << 20}};
  nghttp2_submit_settings(c->s, NGHTTP2_FLAG_NONE, iv, 2);
  nghttp2_session_set_local_window_size(c->s, NGHTTP2_FLAG_NONE, 0, 1 << 30);
  g_nconns++;
  return c;
}

static void add_stream(const uint8_t *req, uint32_t len) {
  conn_t *c = (g_nconns && g_conns[g_nconns - 1].nstreams < g_per_conn) ? &g_conns[g_nconns - 1] : new_conn();
  int ci = (int)(c - g_conns);
  stream_t *st = calloc(1, sizeof *st);
  st->conn = ci;
  st->req_len = 5 + len;
  st->req = malloc(st->req_len);
  st->req[0] = 0;
  st->req[1] = (uint8_t)(len >> 24);
  st->req[2] = (uint8_t)(len >> 16);
  st->req[3] = (uint8_t)(len >> 8);
  st->req[4] = (uint8_t)len;
  memcpy(st->req + 5, req, len);
  st->probe = g_probe_every > 0 && (g_nstreams % (size_t)g_probe_every) == 0;
  nghttp2_nv hdrs[] = {
      {(uint8_t *)":method", (uint8_t *)"POST", 7, 4, NGHTTP2_NV_FLAG_NONE},
      {(uint8_t *)":scheme", (uint8_t *)"http", 7, 4, NGHTTP2_NV_FLAG_NONE},
      {(uint8_t *)":path", (uint8_t *)g_path, 5, strlen(g_path), NGHTTP2_NV_FLAG_NONE},
      {(uint8_t *)":authority", (uint8_t *)g_authority, 10, strlen(g_authority), NGHTTP2_NV_FLAG_NONE},
      {(uint8_t *)"content-type", (uint8_t *)"application/grpc", 12, 16, NGHTTP2_NV_FLAG_NONE},
      {(uint8_t *)"te", (uint8_t *)"trailers", 2, 8, NGHTTP2_NV_FLAG_NONE},
  };
  nghttp2_data_provider dp;
  dp.source.ptr = st;
  dp.read_callback = req_read_cb;
  st->id = nghttp2_submit_request(c->s, NULL, hdrs, sizeof hdrs / sizeof hdrs[0], &dp, st);
  if (st->id < 0) {
    fprintf(stderr, "submit_request: %s\n", nghttp2_strerror(st->id));
    exit(2);
  }
  c->nstreams++;
  if (g_nstreams == g_capstreams) {
    g_capstreams = g_capstreams ? 2 * g_capstreams : 1024;
    g_streams = xrealloc(g_streams, g_capstreams * sizeof(stream_t *));
  }
  g_streams[g_nstreams++] = st;
}

static void flush_conn(conn_t *c) {
  if (c->dead) return;
  if (c->out_len) {
    ssize_t n = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL);
    if (n > 0) {
      memmove(c->out, c->out + n, c->out_len - (size_t)n);
      c->out_len -= (size_t)n;
    } else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
      c->dead = 1;
      return;
    }
  }
  if (c->out_len == 0 && nghttp2_session_want_write(c->s)) {
    if (nghttp2_session_send(c->s) != 0) c->dead = 1;
  }
}

static void read_conn(conn_t *c) {
  uint8_t buf[65536];
  for (;;) {
    ssize_t n = recv(c->fd, buf, sizeof buf, 0);
    if (n > 0) {
      if (nghttp2_session_mem_recv(c->s, buf, (size_t)n) < 0) {
        c->dead = 1;
        snprintf(g_last_error, sizeof g_last_error, "nghttp2 protocol error");
        return;
      }
      if ((size_t)n < sizeof buf) return;
      continue;
    }
    if (n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) {
      if (!c->dead) snprintf(g_last_error, sizeof g_last_error, "connection closed by the server");
      c->dead = 1;
    }
    return;
  }
}

/* --- commands -------------------------------------------------------------------------------------------------- */

static void cmd_add(int n, const char *file) {
  FILE *f = fopen(file, "rb");
  if (!f) {
    printf("error cannot open %s\n.\n", file);
    fflush(stdout);
    return;
  }
  for (int i = 0; i < n; i++) {
    uint8_t hdr[4];
    if (fread(hdr, 1, 4, f) != 4) break;
    uint32_t len = ((uint32_t)hdr[0] << 24) | ((uint32_t)hdr[1] << 16) | ((uint32_t)hdr[2] << 8) | hdr[3];
    uint8_t *req = malloc(len ? len : 1);
    if (len && fread(req, 1, len, f) != len) {
      free(req);
      break;
    }
    add_stream(req, len);
    free(req);
  }
  fclose(f);
  printf("ok %zu\n.\n", g_nstreams);
  fflush(stdout);
}

static void cmd_stats(void) {
  size_t snapped = 0, with_deltas = 0, finished = 0;
  for (size_t i = 0; i < g_nstreams; i++) {
    snapped += g_streams[i]->snapped;
    with_deltas += g_streams[i]->deltas > 0;
    finished += g_streams[i]->finished;
  }
  printf("stats subs=%zu snapped=%zu with_deltas=%zu finished=%zu errors=%lu msgs=%lu bytes=%lu full_equiv=%lu "
         "delta_bytes=%lu deltas=%lu\n",
         g_nstreams, snapped, with_deltas, finished, (unsigned long)g_errors, (unsigned long)g_msgs,
         (unsigned long)g_bytes, (unsigned long)g_full_equiv, (unsigned long)g_delta_bytes, (unsigned long)g_deltas);
  for (size_t i = 0; i < g_nlat; i++) printf("lat %ld %ld\n", (long)g_lat[i].bucket, (long)g_lat[i].recv_us);
  if (g_last_error[0]) printf("err %s\n", g_last_error);
  printf(".\n");
  fflush(stdout);
}

static void cmd_reset(void) {
  g_msgs = g_bytes = g_full_equiv = g_delta_bytes = g_deltas = g_errors = 0;
  g_nlat = 0;
  g_last_error[0] = 0;
  for (size_t i = 0; i < g_nstreams; i++) g_streams[i]->deltas = 0;
  printf("ok\n.\n");
  fflush(stdout);
}

static int handle_line(char *line) {
  int n;
  char file[4096];
  if (sscanf(line, "add %d %4095s", &n, file) == 2) {
    cmd_add(n, file);
  } else if (strncmp(line, "stats", 5) == 0) {
    cmd_stats();
  } else if (strncmp(line, "reset", 5) == 0) {
    cmd_reset();
  } else if (strncmp(line, "quit", 4) == 0) {
    for (int i = 0; i < g_nconns; i++) {
      nghttp2_session_terminate_session(g_conns[i].s, NGHTTP2_NO_ERROR);
      flush_conn(&g_conns[i]);
      close(g_conns[i].fd);
    }
    printf("ok\n.\n");
    fflush(stdout);
    return 0;
  } else {
    printf("error unknown command\n.\n");
    fflush(stdout);
  }
  return 1;
}

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: %s HOST PORT PATH STREAMS_PER_CONNECTION PROBE_EVERY\n", argv[0]);
    return 2;
  }
  g_host = argv[1];
  g_port = argv[2];
  g_path = argv[3];
  g_per_conn = atoi(argv[4]);
  g_probe_every = atoi(argv[5]);
  snprintf(g_authority, sizeof g_authority, "%s:%s", g_host, g_port);
  fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
  char line[8192];
  size_t line_len = 0;
  struct pollfd *pfds = NULL;
  int cap = 0;
  for (;;) {
    for (int i = 0; i < g_nconns; i++) flush_conn(&g_conns[i]);
    if (cap < g_nconns + 1) {
      cap = g_nconns + 16;
      pfds = xrealloc(pfds, (size_t)cap * sizeof *pfds);
    }
    pfds[0].fd = 0;
    pfds[0].events = POLLIN;
    for (int i = 0; i < g_nconns; i++) {
      conn_t *c = &g_conns[i];
      pfds[i + 1].fd = c->dead ? -1 : c->fd;
      pfds[i + 1].events = POLLIN;
      if (c->out_len || nghttp2_session_want_write(c->s)) pfds[i + 1].events |= POLLOUT;
    }
    int nfds = g_nconns + 1;
    if (poll(pfds, (nfds_t)nfds, 1000) < 0) {
      if (errno == EINTR) continue;
      return 2;
    }
    for (int i = 0; i < g_nconns; i++) {
      if (pfds[i + 1].fd >= 0 && (pfds[i + 1].revents & (POLLIN | POLLHUP | POLLERR))) read_conn(&g_conns[i]);
    }
    if (pfds[0].revents & (POLLIN | POLLHUP)) {
      ssize_t n = read(0, line + line_len, sizeof line - 1 - line_len);
      if (n == 0) return 0; /* stdin closed: the driver is gone */
      if (n > 0) {
        line_len += (size_t)n;
        line[line_len] = 0;
        char *nl;
        while ((nl = memchr(line, '\n', line_len)) != NULL) {
          *nl = 0;
          if (!handle_line(line)) return 0;
          size_t used = (size_t)(nl - line) + 1;
          memmove(line, line + used, line_len - used);
          line_len -= used;
          line[line_len] = 0;
        }
      }
    }
  }
}
