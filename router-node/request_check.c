/* request_check.c — strict text rules for the front door's requests (see
 * request_check.h). */
#include "request_check.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#include "status.h"

/* One UTF-8 sequence at s[0..n): its length (1..4) and code point, or 0 when
 * the bytes there are not a well-formed sequence (RFC 3629, table 3-7 of the
 * Unicode standard: overlongs, surrogates and > U+10FFFF are refused). */
static size_t s_utf8_next(const uint8_t *s, size_t n, uint32_t *cp) {
    uint8_t b = s[0];
    if (b < 0x80) {
        *cp = b;
        return 1;
    }
    size_t k;
    uint8_t lo = 0x80, hi = 0xbf;
    if (b >= 0xc2 && b <= 0xdf) {
        k = 2;
        *cp = b & 0x1f;
    } else if (b >= 0xe0 && b <= 0xef) {
        k = 3;
        *cp = b & 0x0f;
        if (b == 0xe0)
            lo = 0xa0; /* overlong */
        if (b == 0xed)
            hi = 0x9f; /* surrogates */
    } else if (b >= 0xf0 && b <= 0xf4) {
        k = 4;
        *cp = b & 0x07;
        if (b == 0xf0)
            lo = 0x90; /* overlong */
        if (b == 0xf4)
            hi = 0x8f; /* past U+10FFFF */
    } else {
        return 0;
    }
    if (n < k)
        return 0;
    for (size_t i = 1; i < k; i++) {
        uint8_t c = s[i];
        if (c < (i == 1 ? lo : 0x80) || c > (i == 1 ? hi : 0xbf))
            return 0;
        *cp = (*cp << 6) | (c & 0x3f);
    }
    return k;
}

/* Characters a case id must not hold: they would break or disguise the log
 * and audit lines it is written into. */
static int s_is_control(uint32_t cp) {
    return cp < 0x20 || cp == 0x7f || (cp >= 0x80 && cp <= 0x9f) || cp == 0x2028 || cp == 0x2029 ||
           cp == 0x200e || cp == 0x200f || (cp >= 0x202a && cp <= 0x202e) ||
           (cp >= 0x2066 && cp <= 0x2069);
}

/* Walk s: the first NUL, bad UTF-8 or (ids) control character. */
static int s_check(const char *field, const uint8_t *s, size_t len, int id, char *err,
                   size_t errlen) {
    for (size_t i = 0; i < len;) {
        if (s[i] == 0)
            return mm_errorf(err, errlen, MM_EINVAL, "%s: NUL byte at offset %zu", field, i);
        uint32_t cp = 0;
        size_t k = s_utf8_next(s + i, len - i, &cp);
        if (!k)
            return mm_errorf(err, errlen, MM_EINVAL,
                             "%s: not valid UTF-8 (byte 0x%02x at offset %zu)", field, s[i], i);
        if (id && s_is_control(cp))
            return mm_errorf(err, errlen, MM_EINVAL,
                             "%s: control or formatting character U+%04X at offset %zu", field,
                             (unsigned)cp, i);
        i += k;
    }
    return MM_OK;
}

int mm_request_check_text(const char *field, const uint8_t *s, size_t len, char *err,
                          size_t errlen) {
    return s_check(field, s, len, 0, err, errlen);
}

int mm_request_check_case_id(const uint8_t *s, size_t len, char *err, size_t errlen) {
    if (len > MM_CASE_ID_MAX)
        return mm_errorf(err, errlen, MM_EINVAL, "case_id: %zu bytes, over the limit of %d", len,
                         MM_CASE_ID_MAX);
    return s_check("case_id", s, len, 1, err, errlen);
}

/* ---- the wire walk -------------------------------------------------------- */

/* A base-128 varint at *p (advanced); 0 on truncation or over 10 bytes. */
static int s_varint(const uint8_t **p, const uint8_t *end, uint64_t *v) {
    *v = 0;
    for (int shift = 0; shift < 70 && *p < end; shift += 7) {
        uint8_t b = *(*p)++;
        *v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80))
            return 1;
    }
    return 0;
}

/* Which text field number f of a message is (NULL: not text). Image
 * (nested in field 2 of both requests) has media_type = 2. */
static const char *s_field_name(mm_req_kind kind, int image, uint64_t f) {
    if (image)
        return f == 2 ? "image.media_type" : NULL;
    switch (f) {
    case 1: return "case_id";
    case 3: return "question";
    case 4: return kind == MM_REQ_CLASSIFY ? "candidates" : NULL;
    case 5: return "conv_mode";
    default: return NULL;
    }
}

static int s_walk(const uint8_t *p, const uint8_t *end, mm_req_kind kind, int image, char *err,
                  size_t errlen) {
    size_t n_cand = 0;
    while (p < end) {
        uint64_t key, v;
        if (!s_varint(&p, end, &key))
            return mm_errorf(err, errlen, MM_EPROTO, "request: truncated field key");
        uint64_t f = key >> 3;
        switch (key & 7) {
        case 0:
            if (!s_varint(&p, end, &v))
                return mm_errorf(err, errlen, MM_EPROTO, "request: truncated varint");
            break;
        case 1:
            if ((size_t)(end - p) < 8)
                return mm_errorf(err, errlen, MM_EPROTO, "request: truncated fixed64");
            p += 8;
            break;
        case 5:
            if ((size_t)(end - p) < 4)
                return mm_errorf(err, errlen, MM_EPROTO, "request: truncated fixed32");
            p += 4;
            break;
        case 2: {
            if (!s_varint(&p, end, &v) || v > (uint64_t)(end - p))
                return mm_errorf(err, errlen, MM_EPROTO, "request: length past the end");
            const uint8_t *s = p;
            p += v;
            const char *name = s_field_name(kind, image, f);
            int rc = MM_OK;
            if (!image && f == 2) {
                rc = s_walk(s, s + v, kind, 1, err, errlen);
            } else if (name && !image && f == 1) {
                rc = mm_request_check_case_id(s, (size_t)v, err, errlen);
            } else if (name && !image && f == 4) {
                char field[48];
                snprintf(field, sizeof field, "candidates[%zu]", n_cand++);
                rc = s_check(field, s, (size_t)v, 0, err, errlen);
            } else if (name) {
                rc = s_check(name, s, (size_t)v, 0, err, errlen);
            }
            if (rc != MM_OK)
                return rc;
            break;
        }
        default: return mm_errorf(err, errlen, MM_EPROTO, "request: wire type %d", (int)(key & 7));
        }
    }
    return MM_OK;
}

int mm_request_check_wire(const uint8_t *msg, size_t len, mm_req_kind kind, char *err,
                          size_t errlen) {
    if (!msg && len)
        return mm_errorf(err, errlen, MM_EPROTO, "request: no bytes");
    return s_walk(msg, msg + len, kind, 0, err, errlen);
}

/* ---- the whole request ---------------------------------------------------- */

/* The image's shape: size, media type, magic bytes. */
static int s_check_image(const Medmoe__V1__Image *img, const mm_request_limits *lim, char *err,
                         size_t errlen) {
    size_t n = img->data.len;
    const uint8_t *d = img->data.data;
    const char *mt = img->media_type ? img->media_type : "";
    if (n == 0)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "image.data: empty (leave image unset for a text-only question)");
    if (n > lim->max_image_bytes)
        return mm_errorf(err, errlen, MM_EINVAL, "image.data: %zu bytes, over the limit of %zu", n,
                         lim->max_image_bytes);
    if (*mt && strcmp(mt, "image/png") && strcmp(mt, "image/jpeg") &&
        strcmp(mt, "application/dicom"))
        return mm_errorf(err, errlen, MM_EINVAL,
                         "image.media_type: '%.64s' is not supported (image/png, image/jpeg, "
                         "application/dicom, or empty to detect)",
                         mt);
    int png = n >= 8 && !memcmp(d, "\x89PNG\r\n\x1a\n", 8);
    int jpeg = n >= 3 && d[0] == 0xff && d[1] == 0xd8 && d[2] == 0xff;
    int dicom = n >= 132 && !memcmp(d + 128, "DICM", 4);
    if (!*mt && !png && !jpeg && !dicom)
        return mm_errorf(err, errlen, MM_EINVAL,
                         "image.data: neither PNG, JPEG nor DICOM (first bytes %02x %02x %02x "
                         "%02x) and no media_type",
                         d[0], n > 1 ? d[1] : 0, n > 2 ? d[2] : 0, n > 3 ? d[3] : 0);
    if (img->dicom && img->dicom->window && *img->dicom->window) {
        mm_dicom_window w;
        char werr[160];
        if (mm_dicom_window_parse(img->dicom->window, &w, werr, sizeof werr) != MM_OK)
            return mm_errorf(err, errlen, MM_EINVAL, "image.dicom.%s", werr);
    }
    if ((!strcmp(mt, "image/png") && !png) || (!strcmp(mt, "image/jpeg") && !jpeg))
        return mm_errorf(err, errlen, MM_EINVAL,
                         "image.data: does not start like %s (the media_type says so)", mt);
    return MM_OK;
}

/* An Ask's generation options into r. */
static int s_options(const Medmoe__V1__GenerationOptions *go, const mm_request_limits *lim,
                     mm_sched_request *r, char *err, size_t errlen) {
    r->max_tokens = lim->max_tokens_default;
    if (!go)
        return MM_OK;
    if (go->max_tokens > (uint32_t)lim->max_tokens_limit)
        return mm_errorf(err, errlen, MM_EINVAL, "options.max_tokens: %u, over the limit of %d",
                         go->max_tokens, lim->max_tokens_limit);
    if (go->max_tokens)
        r->max_tokens = (int)go->max_tokens;
    if (!isfinite(go->temperature) || go->temperature < 0 || go->temperature > 100)
        return mm_errorf(err, errlen, MM_EINVAL, "options.temperature: %g, want 0 (greedy) .. 100",
                         go->temperature);
    if (!isfinite(go->top_p) || go->top_p < 0 || go->top_p > 1)
        return mm_errorf(err, errlen, MM_EINVAL, "options.top_p: %g, want 0 .. 1", go->top_p);
    r->temperature = go->temperature;
    r->top_p = go->top_p > 0 ? go->top_p : 1.0f;
    r->seed = go->seed;
    return MM_OK;
}

/* A Classify's candidates into r (the array as it came: an entry may
 * contain ','; the scheduler copies it at submit). */
static int s_candidates(const Medmoe__V1__ClassifyRequest *k, const mm_request_limits *lim,
                        mm_sched_request *r, char *err, size_t errlen) {
    if (k->n_candidates == 0)
        return mm_errorf(err, errlen, MM_EINVAL, "candidates: none (want at least one)");
    if (k->n_candidates > lim->max_candidates)
        return mm_errorf(err, errlen, MM_EINVAL, "candidates: %zu, over the limit of %zu",
                         k->n_candidates, lim->max_candidates);
    for (size_t i = 0; i < k->n_candidates; i++) {
        const char *t = k->candidates[i];
        if (!t || !*t)
            return mm_errorf(err, errlen, MM_EINVAL, "candidates[%zu]: empty", i);
        if (strlen(t) > lim->max_question_bytes) /* UTF-8, no NUL: checked on the wire */
            return mm_errorf(err, errlen, MM_EINVAL,
                             "candidates[%zu]: %zu bytes, over the limit of %zu", i, strlen(t),
                             lim->max_question_bytes);
    }
    r->candidate_list = (const char *const *)k->candidates;
    r->n_candidate_list = k->n_candidates;
    r->max_tokens = 0;
    return MM_OK;
}

int mm_request_parse(const uint8_t *bytes, size_t len, mm_req_kind kind,
                     const mm_request_limits *lim, mm_request *out, char *err, size_t errlen) {
    memset(out, 0, sizeof *out);
    mm_sched_request_default(&out->r);
    if (kind == MM_REQ_CLASSIFY)
        out->k = medmoe__v1__classify_request__unpack(NULL, len, bytes);
    else
        out->q = medmoe__v1__case_request__unpack(NULL, len, bytes);
    if (!out->q && !out->k)
        return mm_errorf(err, errlen, MM_EINVAL, "request: malformed %s (%zu bytes)",
                         kind == MM_REQ_CLASSIFY ? "ClassifyRequest" : "CaseRequest", len);
    /* the strings' rules on the wire bytes, where a NUL is still visible
     * (unpacked, they are C strings): nothing below sees a cut string */
    int rc = mm_request_check_wire(bytes, len, kind, err, errlen);
    if (rc != MM_OK)
        return MM_EINVAL; /* err names the field and the rule */
    const Medmoe__V1__CaseRequest *q = out->q;
    const Medmoe__V1__ClassifyRequest *k = out->k;
    out->case_id = q ? q->case_id : k->case_id;
    const char *question = q ? q->question : k->question;
    if (!question || !*question)
        return mm_errorf(err, errlen, MM_EINVAL, "question: empty");
    if (strlen(question) > lim->max_question_bytes)
        return mm_errorf(err, errlen, MM_EINVAL, "question: %zu bytes, over the limit of %zu",
                         strlen(question), lim->max_question_bytes);
    const Medmoe__V1__Image *img = q ? q->image : k->image;
    if (img && (rc = s_check_image(img, lim, err, errlen)) != MM_OK)
        return rc;
    mm_sched_request *r = &out->r;
    if (img) {
        r->image_bytes = img->data.data;
        r->image_len = img->data.len;
        r->media_type = img->media_type && *img->media_type ? img->media_type : NULL;
        if (img->dicom) { /* the window name was checked in s_check_image; the frame
                             against the file at submit */
            char werr[160];
            mm_dicom_window_parse(img->dicom->window, &r->dicom.window, werr, sizeof werr);
            r->dicom.frame = img->dicom->frame;
        }
    }
    r->question = question;
    const char *conv = q ? q->conv_mode : k->conv_mode;
    r->conv_mode = conv && *conv ? conv : NULL;
    return q ? s_options(q->options, lim, r, err, errlen) : s_candidates(k, lim, r, err, errlen);
}

void mm_request_clear(mm_request *req) {
    if (req->q)
        medmoe__v1__case_request__free_unpacked(req->q, NULL);
    if (req->k)
        medmoe__v1__classify_request__free_unpacked(req->k, NULL);
    memset(req, 0, sizeof *req);
}

/* ---- self-test ------------------------------------------------------------ */

int mm_request_check_selftest(int verbose) {
    static const struct {
        const char *s;
        size_t n;
        int id;           /* checked as a case id */
        int ok;           /* expected MM_OK */
        const char *want; /* substring of the message */
    } cases[] = {
        {"What modality?", 14, 0, 1, NULL},
        {"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", 14, 0, 1, NULL},
        {"What\0 modality", 14, 0, 0, "NUL byte at offset 4"},
        {"ab\xff", 3, 0, 0, "byte 0xff at offset 2"},
        {"\xc0\xaf", 2, 0, 0, "offset 0"},               /* overlong '/' */
        {"\xe0\x80\xaf", 3, 0, 0, "offset 0"},           /* overlong, 3 bytes */
        {"\xed\xa0\x80", 3, 0, 0, "offset 0"},           /* a surrogate */
        {"\xf4\x90\x80\x80", 4, 0, 0, "offset 0"},       /* past U+10FFFF */
        {"x\xe2\x82", 3, 0, 0, "offset 1"},              /* truncated */
        {"line\nbreak", 10, 0, 1, NULL},                 /* a question may */
        {"line\nbreak", 10, 1, 0, "U+000A at offset 4"}, /* an id may not */
        {"id\x7f", 3, 1, 0, "U+007F"},
        {"id\xc2\x85", 4, 1, 0, "U+0085"},
        {"\xe2\x80\xae"
         "evil",
         7, 1, 0, "U+202E"},
        {"case-42/\xc3\xa9", 10, 1, 1, NULL},
    };
    char err[256];
    int rc = MM_OK;
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const uint8_t *s = (const uint8_t *)cases[i].s;
        int r = cases[i].id ? mm_request_check_case_id(s, cases[i].n, err, sizeof err)
                            : mm_request_check_text("question", s, cases[i].n, err, sizeof err);
        if ((r == MM_OK) != cases[i].ok || (!cases[i].ok && !strstr(err, cases[i].want))) {
            if (verbose)
                fprintf(stderr, "request_check selftest: case %zu: rc %d, message '%s' (want %s)\n",
                        i, r, r == MM_OK ? "" : err, cases[i].ok ? "OK" : cases[i].want);
            rc = MM_ERR;
        }
    }
    uint8_t long_id[MM_CASE_ID_MAX + 1];
    memset(long_id, 'a', sizeof long_id);
    if (mm_request_check_case_id(long_id, MM_CASE_ID_MAX, err, sizeof err) != MM_OK ||
        mm_request_check_case_id(long_id, MM_CASE_ID_MAX + 1, err, sizeof err) != MM_EINVAL ||
        !strstr(err, "over the limit of 256")) {
        if (verbose)
            fprintf(stderr, "request_check selftest: the case id length limit\n");
        rc = MM_ERR;
    }
    /* wire: CaseRequest{case_id "ok", image{media_type "image/png\0x"}, question "Q"} */
    static const uint8_t w1[] = {0x0a, 2,   'o', 'k', 0x12, 12,  0x12, 10,   'i', 'm', 'a',
                                 'g',  'e', '/', 'p', 'n',  'g', 0,    0x1a, 1,   'Q'};
    static const uint8_t w2[] = {0x0a, 2, 'o', 'k', 0x22, 1, 'a', 0x22, 2, 'b', 0xfe, 0x1a, 1, 'Q'};
    static const uint8_t w3[] = {0x0a, 9, 'o', 'k'};
    if (mm_request_check_wire(w1, sizeof w1, MM_REQ_CASE, err, sizeof err) != MM_EINVAL ||
        !strstr(err, "image.media_type: NUL byte at offset 9") ||
        mm_request_check_wire(w2, sizeof w2, MM_REQ_CLASSIFY, err, sizeof err) != MM_EINVAL ||
        !strstr(err, "candidates[1]: not valid UTF-8") ||
        mm_request_check_wire(w2, sizeof w2 - 3, MM_REQ_CASE, err, sizeof err) != MM_OK ||
        mm_request_check_wire(w3, sizeof w3, MM_REQ_CASE, err, sizeof err) != MM_EPROTO) {
        if (verbose)
            fprintf(stderr, "request_check selftest: wire walk: '%s'\n", err);
        rc = MM_ERR;
    }
    return rc;
}
