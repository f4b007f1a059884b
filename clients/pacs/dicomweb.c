/* dicomweb.c — DICOMweb and Orthanc REST over libcurl (see dicomweb.h). */
#include "dicomweb.h"

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "status.h"

/* A reply larger than this is refused: one DICOM instance or one study's
 * metadata, never a whole archive. */
#define S_MAX_BODY ((size_t)1 << 30)

struct mm_dweb {
    CURL *curl;      /* one handle: connections are kept alive between calls */
    char *orthanc;   /* REST root, no trailing slash                         */
    char *dicomweb;  /* DICOMweb root, no trailing slash                     */
    char *userpwd;   /* "user:password" or NULL                              */
    char *ca_file;   /* or NULL                                              */
    long timeout_ms; /* per request                                          */
    const volatile sig_atomic_t *stop;
};

typedef struct s_body {
    uint8_t *p;
    size_t n, cap;
    int too_big;
    char ctype[512]; /* the reply's Content-Type */
} s_body;

void mm_dweb_options_default(mm_dweb_options *o) {
    memset(o, 0, sizeof *o);
    o->timeout_ms = 30000;
}

static char *s_strip_dup(const char *s) {
    size_t n = strlen(s);
    while (n > 0 && s[n - 1] == '/')
        n--;
    char *r = malloc(n + 1);
    if (r) {
        memcpy(r, s, n);
        r[n] = '\0';
    }
    return r;
}

int mm_dweb_new(const mm_dweb_options *o, mm_dweb **out, char *err, size_t errlen) {
    *out = NULL;
    if (!o->orthanc || !*o->orthanc)
        return mm_errorf(err, errlen, MM_EINVAL, "PACS: no Orthanc URL (--orthanc)");
    if (strncmp(o->orthanc, "http://", 7) && strncmp(o->orthanc, "https://", 8))
        return mm_errorf(err, errlen, MM_EINVAL, "PACS: --orthanc %s: want http:// or https://",
                         o->orthanc);
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return mm_errorf(err, errlen, MM_ERR, "PACS: curl_global_init failed");
    mm_dweb *d = calloc(1, sizeof *d);
    if (!d)
        return mm_errorf(err, errlen, MM_ENOMEM, "PACS: out of memory");
    d->timeout_ms = o->timeout_ms > 0 ? o->timeout_ms : 30000;
    d->stop = o->stop;
    d->orthanc = s_strip_dup(o->orthanc);
    if (o->dicomweb && *o->dicomweb) {
        d->dicomweb = s_strip_dup(o->dicomweb);
    } else if (d->orthanc) {
        size_t n = strlen(d->orthanc) + sizeof "/dicom-web";
        if ((d->dicomweb = malloc(n)))
            snprintf(d->dicomweb, n, "%s/dicom-web", d->orthanc);
    }
    if (o->user) {
        size_t n = strlen(o->user) + (o->password ? strlen(o->password) : 0) + 2;
        if ((d->userpwd = malloc(n)))
            snprintf(d->userpwd, n, "%s:%s", o->user, o->password ? o->password : "");
    }
    if (o->ca_file)
        d->ca_file = strdup(o->ca_file);
    d->curl = curl_easy_init();
    if (!d->orthanc || !d->dicomweb || (o->user && !d->userpwd) || (o->ca_file && !d->ca_file) ||
        !d->curl) {
        mm_dweb_destroy(&d);
        return mm_errorf(err, errlen, MM_ENOMEM, "PACS: out of memory (or curl_easy_init failed)");
    }
    *out = d;
    return MM_OK;
}

void mm_dweb_destroy(mm_dweb **dp) {
    if (!dp || !*dp)
        return;
    mm_dweb *d = *dp;
    if (d->curl)
        curl_easy_cleanup(d->curl);
    free(d->orthanc);
    free(d->dicomweb);
    if (d->userpwd) {
        memset(d->userpwd, 0, strlen(d->userpwd));
        free(d->userpwd);
    }
    free(d->ca_file);
    free(d);
    *dp = NULL;
}

static size_t s_write(char *ptr, size_t size, size_t nmemb, void *user) {
    s_body *b = user;
    size_t n = size * nmemb;
    if (b->n + n > S_MAX_BODY) {
        b->too_big = 1;
        return 0;
    }
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 65536;
        while (cap < b->n + n)
            cap *= 2;
        uint8_t *p = realloc(b->p, cap + 1);
        if (!p)
            return 0;
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, ptr, n);
    b->n += n;
    b->p[b->n] = '\0'; /* so JSON and text can be read in place */
    return n;
}

static size_t s_header(char *ptr, size_t size, size_t nitems, void *user) {
    s_body *b = user;
    size_t n = size * nitems;
    if (n > 13 && !strncasecmp(ptr, "Content-Type:", 13)) {
        const char *v = ptr + 13;
        size_t vn = n - 13;
        while (vn && (*v == ' ' || *v == '\t'))
            v++, vn--;
        while (vn && (v[vn - 1] == '\r' || v[vn - 1] == '\n'))
            vn--;
        if (vn >= sizeof b->ctype)
            vn = sizeof b->ctype - 1;
        memcpy(b->ctype, v, vn);
        b->ctype[vn] = '\0';
    }
    return n;
}

static int s_progress(void *user, curl_off_t a, curl_off_t b, curl_off_t c, curl_off_t e) {
    (void)a, (void)b, (void)c, (void)e;
    const mm_dweb *d = user;
    return d->stop && *d->stop ? 1 : 0;
}

/* One request. method "GET" or "POST" (with body/ctype). Fills b; returns
 * MM_OK for 2xx, else a status naming path and cause. */
static int s_request(mm_dweb *d, const char *url, const char *accept, const uint8_t *post,
                     size_t post_len, const char *post_ctype, s_body *b, long *http, char *err,
                     size_t errlen) {
    memset(b, 0, sizeof *b);
    *http = 0;
    CURL *c = d->curl;
    curl_easy_reset(c);
    struct curl_slist *hdr = NULL, *h2 = NULL;
    char line[640];
    if (accept) {
        snprintf(line, sizeof line, "Accept: %s", accept);
        if (!(h2 = curl_slist_append(hdr, line)))
            return mm_errorf(err, errlen, MM_ENOMEM, "PACS: out of memory");
        hdr = h2;
    }
    if (post_ctype) {
        snprintf(line, sizeof line, "Content-Type: %s", post_ctype);
        if (!(h2 = curl_slist_append(hdr, line))) {
            curl_slist_free_all(hdr);
            return mm_errorf(err, errlen, MM_ENOMEM, "PACS: out of memory");
        }
        hdr = h2;
    }
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdr);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, s_write);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, b);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, s_header);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, b);
    curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, s_progress);
    curl_easy_setopt(c, CURLOPT_XFERINFODATA, d);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, d->timeout_ms);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, d->timeout_ms < 10000 ? d->timeout_ms : 10000L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    if (d->userpwd) {
        curl_easy_setopt(c, CURLOPT_HTTPAUTH, CURLAUTH_BASIC);
        curl_easy_setopt(c, CURLOPT_USERPWD, d->userpwd);
    }
    if (d->ca_file)
        curl_easy_setopt(c, CURLOPT_CAINFO, d->ca_file);
    if (post) {
        curl_easy_setopt(c, CURLOPT_POST, 1L);
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, (const char *)post);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)post_len);
    }
    /* The path alone in messages: the URL may carry a host the log need not repeat. */
    const char *path = strstr(url, "://");
    path = path ? strchr(path + 3, '/') : NULL;
    if (!path)
        path = url;
    CURLcode cc = curl_easy_perform(c);
    curl_slist_free_all(hdr);
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, http);
    if (cc != CURLE_OK) {
        free(b->p);
        b->p = NULL;
        if (cc == CURLE_ABORTED_BY_CALLBACK)
            return mm_errorf(err, errlen, MM_ECANCELLED, "PACS: %s: abandoned (stopping)", path);
        if (b->too_big)
            return mm_errorf(err, errlen, MM_EPROTO, "PACS: %s: reply over %zu bytes", path,
                             S_MAX_BODY);
        return mm_errorf(err, errlen,
                         cc == CURLE_OUT_OF_MEMORY || cc == CURLE_WRITE_ERROR ? MM_ENOMEM
                                                                              : MM_EAGAIN,
                         "PACS: %s: %s", path, curl_easy_strerror(cc));
    }
    if (*http < 200 || *http > 299) {
        int st = *http == 404                                     ? MM_ENOTFOUND
                 : (*http >= 500 || *http == 429 || *http == 408) ? MM_EAGAIN
                                                                  : MM_EPROTO;
        /* The PACS's own message, cut short (Orthanc answers JSON with "Message"). */
        char msg[200] = "";
        if (b->p) {
            json_t *j = json_loadb((const char *)b->p, b->n, 0, NULL);
            const char *m = j ? json_string_value(json_object_get(j, "Message")) : NULL;
            snprintf(msg, sizeof msg, ": %s", m ? m : "");
            json_decref(j);
        }
        free(b->p);
        b->p = NULL;
        return mm_errorf(err, errlen, st, "PACS: %s: HTTP %ld%s", path, *http, msg[2] ? msg : "");
    }
    return MM_OK;
}

static int s_get_json(mm_dweb *d, const char *url, const char *accept, json_t **out, int *empty,
                      char *err, size_t errlen) {
    *out = NULL;
    s_body b;
    long http;
    int rc = s_request(d, url, accept, NULL, 0, NULL, &b, &http, err, errlen);
    if (rc != MM_OK)
        return rc;
    if (empty && (http == 204 || b.n == 0)) { /* QIDO-RS: no match */
        free(b.p);
        *empty = 1;
        return MM_OK;
    }
    json_error_t je;
    *out = json_loadb(b.p ? (const char *)b.p : "", b.n, 0, &je);
    free(b.p);
    if (!*out) {
        const char *path = strstr(url, "://");
        path = path ? strchr(path + 3, '/') : url;
        return mm_errorf(err, errlen, MM_EPROTO, "PACS: %s: reply is not JSON: %s (line %d)",
                         path ? path : url, je.text, je.line);
    }
    return MM_OK;
}

int mm_dweb_rest_json(mm_dweb *d, const char *path, json_t **out, char *err, size_t errlen) {
    char url[2048];
    snprintf(url, sizeof url, "%s%s", d->orthanc, path);
    return s_get_json(d, url, "application/json", out, NULL, err, errlen);
}

int mm_dweb_study_metadata(mm_dweb *d, const char *study, const char *series, json_t **out,
                           char *err, size_t errlen) {
    char url[2048];
    if (series)
        snprintf(url, sizeof url, "%s/studies/%s/series/%s/metadata", d->dicomweb, study, series);
    else
        snprintf(url, sizeof url, "%s/studies/%s/metadata", d->dicomweb, study);
    int rc = s_get_json(d, url, "application/dicom+json", out, NULL, err, errlen);
    if (rc == MM_OK && !json_is_array(*out)) {
        json_decref(*out);
        *out = NULL;
        return mm_errorf(err, errlen, MM_EPROTO, "PACS: metadata of study %s: not a JSON array",
                         study);
    }
    return rc;
}

int mm_dweb_instance_exists(mm_dweb *d, const char *study, const char *sop, int *found, char *err,
                            size_t errlen) {
    *found = 0;
    char url[2048];
    snprintf(url, sizeof url, "%s/studies/%s/instances?SOPInstanceUID=%s", d->dicomweb, study, sop);
    json_t *j = NULL;
    int empty = 0;
    int rc = s_get_json(d, url, "application/dicom+json", &j, &empty, err, errlen);
    if (rc == MM_ENOTFOUND) /* the study itself unknown: no such instance either */
        return MM_OK;
    if (rc != MM_OK)
        return rc;
    if (!empty && json_is_array(j)) {
        char buf[8];
        for (size_t i = 0; i < json_array_size(j); i++) {
            const char *v = mm_dweb_attr(json_array_get(j, i), "00080018", buf, sizeof buf);
            if (v && !strcmp(v, sop))
                *found = 1;
        }
    }
    json_decref(j);
    return MM_OK;
}

/* The boundary parameter of a multipart Content-Type, quotes removed. */
static int s_boundary(const char *ctype, char *out, size_t outlen) {
    const char *p = ctype;
    while ((p = strcasestr(p, "boundary="))) {
        if (p == ctype || p[-1] == ';' || p[-1] == ' ' || p[-1] == '\t')
            break;
        p++;
    }
    if (!p)
        return -1;
    p += 9;
    int quoted = *p == '"';
    if (quoted)
        p++;
    size_t n = 0;
    while (p[n] && (quoted ? p[n] != '"' : (p[n] != ';' && p[n] != ' ')))
        n++;
    if (n == 0 || n + 1 > outlen)
        return -1;
    memcpy(out, p, n);
    out[n] = '\0';
    return 0;
}

static const uint8_t *s_find(const uint8_t *h, size_t hn, const char *needle, size_t nn) {
    if (nn == 0 || hn < nn)
        return NULL;
    for (size_t i = 0; i + nn <= hn; i++)
        if (h[i] == (uint8_t)needle[0] && !memcmp(h + i, needle, nn))
            return h + i;
    return NULL;
}

/* The first part of a multipart/related body (RFC 2046): between the first
 * "--boundary" line and the next "\r\n--boundary", after the part's headers. */
static int s_first_part(const uint8_t *body, size_t n, const char *ctype, const uint8_t **part,
                        size_t *part_len, char *err, size_t errlen, const char *what) {
    char bnd[256], delim[260];
    if (s_boundary(ctype, bnd, sizeof bnd))
        return mm_errorf(err, errlen, MM_EPROTO, "PACS: %s: Content-Type '%s' has no boundary",
                         what, ctype);
    int dn = snprintf(delim, sizeof delim, "--%s", bnd);
    const uint8_t *s = s_find(body, n, delim, (size_t)dn);
    if (!s)
        return mm_errorf(err, errlen, MM_EPROTO, "PACS: %s: no multipart boundary in the reply",
                         what);
    s += dn;
    const uint8_t *hend = s_find(s, n - (size_t)(s - body), "\r\n\r\n", 4);
    if (!hend)
        return mm_errorf(err, errlen, MM_EPROTO, "PACS: %s: multipart part without headers", what);
    const uint8_t *data = hend + 4;
    char close[264];
    int cn = snprintf(close, sizeof close, "\r\n--%s", bnd);
    const uint8_t *e = s_find(data, n - (size_t)(data - body), close, (size_t)cn);
    if (!e)
        return mm_errorf(err, errlen, MM_EPROTO, "PACS: %s: multipart part not closed", what);
    *part = data;
    *part_len = (size_t)(e - data);
    return MM_OK;
}

int mm_dweb_retrieve(mm_dweb *d, const char *study, const char *series, const char *sop,
                     int rendered, uint8_t **data, size_t *len, char *err, size_t errlen) {
    *data = NULL;
    *len = 0;
    char url[2048], what[256];
    snprintf(url, sizeof url, "%s/studies/%s/series/%s/instances/%s%s", d->dicomweb, study, series,
             sop, rendered ? "/rendered" : "");
    snprintf(what, sizeof what, "instance %.64s%s", sop, rendered ? " (rendered)" : "");
    s_body b;
    long http;
    int rc =
        s_request(d, url, rendered ? "image/png" : "multipart/related; type=\"application/dicom\"",
                  NULL, 0, NULL, &b, &http, err, errlen);
    if (rc != MM_OK)
        return rc;
    if (rendered) {
        if (b.n < 8 || memcmp(b.p, "\x89PNG", 4)) {
            free(b.p);
            return mm_errorf(err, errlen, MM_EPROTO, "PACS: %s: reply is not a PNG (%s)", what,
                             b.ctype);
        }
        *data = b.p;
        *len = b.n;
        return MM_OK;
    }
    const uint8_t *part = NULL;
    size_t pn = 0;
    if (strncasecmp(b.ctype, "multipart/related", 17)) {
        rc = mm_errorf(err, errlen, MM_EPROTO,
                       "PACS: %s: Content-Type '%s', want multipart/related", what, b.ctype);
    } else if ((rc = s_first_part(b.p, b.n, b.ctype, &part, &pn, err, errlen, what)) == MM_OK) {
        if (pn < 132 || memcmp(part + 128, "DICM", 4)) {
            rc = mm_errorf(err, errlen, MM_EPROTO, "PACS: %s: the part is not a DICOM file", what);
        } else if (!(*data = malloc(pn))) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "PACS: out of memory (%zu bytes)", pn);
        } else {
            memcpy(*data, part, pn);
            *len = pn;
        }
    }
    free(b.p);
    return rc;
}

int mm_dweb_store(mm_dweb *d, const char *study, const uint8_t *dcm, size_t len, char *err,
                  size_t errlen) {
    static const char bnd[] = "medmoe-pacs-stow-7f3a9c51e2b84d06";
    static const char head[] = "--medmoe-pacs-stow-7f3a9c51e2b84d06\r\n"
                               "Content-Type: application/dicom\r\n\r\n";
    static const char tail[] = "\r\n--medmoe-pacs-stow-7f3a9c51e2b84d06--\r\n";
    size_t n = sizeof head - 1 + len + sizeof tail - 1;
    uint8_t *body = malloc(n);
    if (!body)
        return mm_errorf(err, errlen, MM_ENOMEM, "PACS: out of memory (%zu bytes)", n);
    memcpy(body, head, sizeof head - 1);
    memcpy(body + sizeof head - 1, dcm, len);
    memcpy(body + sizeof head - 1 + len, tail, sizeof tail - 1);
    char url[2048], ctype[256];
    snprintf(url, sizeof url, "%s/studies/%s", d->dicomweb, study);
    snprintf(ctype, sizeof ctype, "multipart/related; type=\"application/dicom\"; boundary=%s",
             bnd);
    s_body b;
    long http;
    int rc = s_request(d, url, "application/dicom+json", body, n, ctype, &b, &http, err, errlen);
    free(body);
    if (rc != MM_OK)
        return rc;
    /* PS3.18 10.5.3: stored instances are in Referenced SOP Sequence (0008,1199);
     * refused ones in Failed SOP Sequence (0008,1198) with a Failure Reason. */
    json_t *j = json_loadb(b.p ? (const char *)b.p : "", b.n, 0, NULL);
    free(b.p);
    json_t *failed = j ? json_object_get(json_object_get(j, "00081198"), "Value") : NULL;
    json_t *stored = j ? json_object_get(json_object_get(j, "00081199"), "Value") : NULL;
    if (json_array_size(failed) > 0) {
        char buf[32];
        const char *why = mm_dweb_attr(json_array_get(failed, 0), "00081197", buf, sizeof buf);
        /* Failure Reason codes are written in hex in PS3.18 (A700 out of resources, ...). */
        char reason[32] = "not given";
        if (why)
            snprintf(reason, sizeof reason, "%04lX", strtol(why, NULL, 10));
        rc = mm_errorf(err, errlen, MM_EPROTO, "PACS: STOW-RS to study %s refused it (reason %s)",
                       study, reason);
    } else if (json_array_size(stored) == 0 && http != 200) {
        rc = mm_errorf(err, errlen, MM_EPROTO,
                       "PACS: STOW-RS to study %s: HTTP %ld, nothing stored", study, http);
    }
    json_decref(j);
    return rc;
}

const char *mm_dweb_attr(json_t *obj, const char *tag, char *buf, size_t buflen) {
    json_t *v = json_object_get(json_object_get(obj, tag), "Value");
    json_t *x = json_array_get(v, 0);
    if (json_is_string(x))
        return json_string_value(x);
    if (json_is_object(x)) /* PN */
        return json_string_value(json_object_get(x, "Alphabetic"));
    if (json_is_integer(x)) {
        snprintf(buf, buflen, "%lld", (long long)json_integer_value(x));
        return buf;
    }
    if (json_is_real(x)) {
        snprintf(buf, buflen, "%g", json_real_value(x));
        return buf;
    }
    return NULL;
}
