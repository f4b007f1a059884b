/* safetensors.c — validated, memory-mapped safetensors files and checkpoints.
 *
 * Sections: dtypes · one file (map, parse header, check tensors) · lookups ·
 * checkpoint directories (index, single file, loose files) · checked getter.
 */
#include "safetensors.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ==== dtypes ============================================================== */

static const struct {
    const char *name;
    size_t size;
} s_dtypes[MM_ST_DTYPE_COUNT] = {
    [MM_ST_F32] = {"F32", 4},   [MM_ST_F16] = {"F16", 2},         [MM_ST_BF16] = {"BF16", 2},
    [MM_ST_F64] = {"F64", 8},   [MM_ST_I64] = {"I64", 8},         [MM_ST_I32] = {"I32", 4},
    [MM_ST_I16] = {"I16", 2},   [MM_ST_I8] = {"I8", 1},           [MM_ST_U64] = {"U64", 8},
    [MM_ST_U32] = {"U32", 4},   [MM_ST_U16] = {"U16", 2},         [MM_ST_U8] = {"U8", 1},
    [MM_ST_BOOL] = {"BOOL", 1}, [MM_ST_F8_E4M3] = {"F8_E4M3", 1}, [MM_ST_F8_E5M2] = {"F8_E5M2", 1},
};

const char *mm_st_dtype_name(mm_st_dtype t) {
    return (unsigned)t < MM_ST_DTYPE_COUNT ? s_dtypes[t].name : "?";
}

size_t mm_st_dtype_size(mm_st_dtype t) {
    return (unsigned)t < MM_ST_DTYPE_COUNT ? s_dtypes[t].size : 0;
}

static int s_dtype_parse(const char *s, mm_st_dtype *out) {
    for (int i = 0; i < MM_ST_DTYPE_COUNT; i++)
        if (strcmp(s, s_dtypes[i].name) == 0) {
            *out = (mm_st_dtype)i;
            return 1;
        }
    return 0;
}

static mm_dtype s_compute_dtype(mm_st_dtype t) {
    switch (t) {
    case MM_ST_F32: return MM_F32;
    case MM_ST_F16: return MM_F16;
    case MM_ST_BF16: return MM_BF16;
    case MM_ST_I32: return MM_I32;
    default: return MM_DTYPE_COUNT;
    }
}

char *mm_st_shape_str(const mm_st_tensor *t, char *buf, size_t len) {
    size_t n = 0;
    if (!buf || len == 0)
        return buf;
    buf[0] = '\0';
    n += (size_t)snprintf(buf + n, len - n, "[");
    for (int i = 0; i < t->ndim && n < len; i++)
        n += (size_t)snprintf(buf + n, len - n, "%s%zu", i ? ", " : "", t->shape[i]);
    if (n < len)
        snprintf(buf + n, len - n, "]");
    return buf;
}

/* ==== one file ============================================================ */

struct mm_st_file {
    char *path;            /* as opened                                 */
    void *map;             /* whole file, PROT_READ / MAP_PRIVATE       */
    size_t size;           /* file size in bytes                        */
    mm_st_tensor *tensors; /* sorted by name                            */
    char **names;          /* owned name strings, one per tensor        */
    size_t n;              /* number of tensors                         */
    char **meta_keys;      /* __metadata__ keys, sorted                 */
    char **meta_vals;      /* values, parallel to meta_keys             */
    size_t nmeta;          /* number of metadata entries                */
};

static int s_cmp_tensor_name(const void *a, const void *b) {
    return strcmp(((const mm_st_tensor *)a)->name, ((const mm_st_tensor *)b)->name);
}

static int s_cmp_tensor_offset(const void *a, const void *b) {
    const mm_st_tensor *x = *(const mm_st_tensor *const *)a, *y = *(const mm_st_tensor *const *)b;
    if (x->file_offset != y->file_offset)
        return x->file_offset < y->file_offset ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

void mm_st_destroy(mm_st_file **pf) {
    if (!pf || !*pf)
        return;
    mm_st_file *f = *pf;
    if (f->map && f->map != MAP_FAILED)
        munmap(f->map, f->size);
    for (size_t i = 0; i < f->n; i++)
        free(f->names ? f->names[i] : NULL);
    free(f->names);
    free(f->tensors);
    for (size_t i = 0; i < f->nmeta; i++) {
        free(f->meta_keys[i]);
        free(f->meta_vals[i]);
    }
    free(f->meta_keys);
    free(f->meta_vals);
    free(f->path);
    free(f);
    *pf = NULL;
}

/* Read a non-negative JSON integer that fits in uint64; 0 on success. */
static int s_json_u64(const json_t *v, uint64_t *out) {
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return -1;
    *out = (uint64_t)json_integer_value(v);
    return 0;
}

/* Parse __metadata__ into sorted key/value arrays. */
static int s_parse_metadata(mm_st_file *f, json_t *meta, char *err, size_t errlen) {
    if (!json_is_object(meta))
        return mm_errorf(err, errlen, MM_EPROTO, "%s: __metadata__ is not a JSON object", f->path);
    size_t cnt = json_object_size(meta);
    f->meta_keys = calloc(cnt ? cnt : 1, sizeof *f->meta_keys);
    f->meta_vals = calloc(cnt ? cnt : 1, sizeof *f->meta_vals);
    if (!f->meta_keys || !f->meta_vals)
        return mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", f->path);
    const char *key;
    json_t *val;
    json_object_foreach(meta, key, val) {
        if (!json_is_string(val))
            return mm_errorf(err, errlen, MM_EPROTO, "%s: __metadata__ entry '%s' is not a string",
                             f->path, key);
        f->meta_keys[f->nmeta] = strdup(key);
        f->meta_vals[f->nmeta] = strdup(json_string_value(val));
        f->nmeta++; /* counted before the check so destroy frees a partial pair */
        if (!f->meta_keys[f->nmeta - 1] || !f->meta_vals[f->nmeta - 1])
            return mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", f->path);
    }
    /* Sort by key (insertion sort: metadata has a handful of entries). */
    for (size_t i = 1; i < f->nmeta; i++)
        for (size_t j = i; j > 0 && strcmp(f->meta_keys[j - 1], f->meta_keys[j]) > 0; j--) {
            char *k = f->meta_keys[j], *v = f->meta_vals[j];
            f->meta_keys[j] = f->meta_keys[j - 1];
            f->meta_vals[j] = f->meta_vals[j - 1];
            f->meta_keys[j - 1] = k;
            f->meta_vals[j - 1] = v;
        }
    return MM_OK;
}

/* Validate one header entry and fill t. data_start/data_len: the data section. */
static int s_parse_tensor(mm_st_file *f, const char *name, json_t *e, size_t data_start,
                          size_t data_len, mm_st_tensor *t, char *err, size_t errlen) {
    const char *p = f->path;
    if (!json_is_object(e))
        return mm_errorf(err, errlen, MM_EPROTO, "%s: tensor '%s': entry is not a JSON object", p,
                         name);
    json_t *jd = json_object_get(e, "dtype"), *js = json_object_get(e, "shape"),
           *jo = json_object_get(e, "data_offsets");
    if (!jd)
        return mm_errorf(err, errlen, MM_EPROTO, "%s: tensor '%s': field 'dtype' missing", p, name);
    if (!js)
        return mm_errorf(err, errlen, MM_EPROTO, "%s: tensor '%s': field 'shape' missing", p, name);
    if (!jo)
        return mm_errorf(err, errlen, MM_EPROTO, "%s: tensor '%s': field 'data_offsets' missing", p,
                         name);
    if (!json_is_string(jd))
        return mm_errorf(err, errlen, MM_EPROTO, "%s: tensor '%s': 'dtype' is not a string", p,
                         name);
    if (!s_dtype_parse(json_string_value(jd), &t->st_dtype))
        return mm_errorf(err, errlen, MM_EPROTO, "%s: tensor '%s': unknown dtype \"%s\"", p, name,
                         json_string_value(jd));
    if (!json_is_array(js))
        return mm_errorf(err, errlen, MM_EPROTO, "%s: tensor '%s': 'shape' is not an array", p,
                         name);
    size_t nd = json_array_size(js);
    if (nd > MM_MAX_DIMS)
        return mm_errorf(err, errlen, MM_EPROTO, "%s: tensor '%s': %zu dims, at most %d supported",
                         p, name, nd, MM_MAX_DIMS);
    t->ndim = (int)nd;
    t->nelem = 1;
    for (int i = 0; i < MM_MAX_DIMS; i++)
        t->shape[i] = 1;
    for (size_t i = 0; i < nd; i++) {
        uint64_t d;
        if (s_json_u64(json_array_get(js, i), &d) != 0)
            return mm_errorf(err, errlen, MM_EPROTO,
                             "%s: tensor '%s': shape[%zu] is not a non-negative integer", p, name,
                             i);
        if (d > SIZE_MAX || !mm_size_mul(t->nelem, (size_t)d, &t->nelem))
            return mm_errorf(err, errlen, MM_EPROTO,
                             "%s: tensor '%s': element count of the shape overflows", p, name);
        t->shape[i] = (size_t)d;
    }
    if (!mm_size_mul(t->nelem, mm_st_dtype_size(t->st_dtype), &t->nbytes))
        return mm_errorf(err, errlen, MM_EPROTO, "%s: tensor '%s': byte size overflows", p, name);
    uint64_t b, en;
    if (!json_is_array(jo) || json_array_size(jo) != 2 ||
        s_json_u64(json_array_get(jo, 0), &b) != 0 || s_json_u64(json_array_get(jo, 1), &en) != 0)
        return mm_errorf(err, errlen, MM_EPROTO,
                         "%s: tensor '%s': 'data_offsets' is not [begin, end] of non-negative "
                         "integers",
                         p, name);
    if (b > en)
        return mm_errorf(err, errlen, MM_EPROTO,
                         "%s: tensor '%s': data_offsets begin %" PRIu64 " > end %" PRIu64, p, name,
                         b, en);
    if (en > data_len)
        return mm_errorf(err, errlen, MM_EPROTO,
                         "%s: tensor '%s': data_offsets end %" PRIu64
                         " beyond the data section (%zu bytes)",
                         p, name, en, data_len);
    if (en - b != t->nbytes) {
        char sh[128];
        return mm_errorf(err, errlen, MM_EPROTO,
                         "%s: tensor '%s': data_offsets span %" PRIu64
                         " bytes but shape %s × %s needs %zu",
                         p, name, en - b, mm_st_shape_str(t, sh, sizeof sh),
                         mm_st_dtype_name(t->st_dtype), t->nbytes);
    }
    t->file_offset = data_start + (size_t)b;
    t->data = (const char *)f->map + t->file_offset;
    t->dtype = s_compute_dtype(t->st_dtype);
    t->usable = t->st_dtype == MM_ST_F32 || t->st_dtype == MM_ST_F16 || t->st_dtype == MM_ST_BF16;
    t->file = f->path;
    return MM_OK;
}

/* Parse the header JSON (already bounds-checked) into f. */
static int s_parse_header(mm_st_file *f, size_t hlen, char *err, size_t errlen) {
    const char *hdr = (const char *)f->map + 8;
    size_t data_start = 8 + hlen, data_len = f->size - data_start;
    json_error_t jerr;
    json_t *root = json_loadb(hdr, hlen, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return mm_errorf(err, errlen, MM_EPROTO, "%s: header is not valid JSON: %s (offset %d)",
                         f->path, jerr.text, jerr.position);
    int rc = MM_OK;
    if (!json_is_object(root)) {
        rc = mm_errorf(err, errlen, MM_EPROTO, "%s: header is not a JSON object", f->path);
        goto out;
    }
    size_t cnt = json_object_size(root);
    f->tensors = calloc(cnt ? cnt : 1, sizeof *f->tensors);
    f->names = calloc(cnt ? cnt : 1, sizeof *f->names);
    if (!f->tensors || !f->names) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory for %zu tensors", f->path, cnt);
        goto out;
    }
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (strcmp(key, "__metadata__") == 0) {
            if ((rc = s_parse_metadata(f, val, err, errlen)) != MM_OK)
                goto out;
            continue;
        }
        mm_st_tensor *t = &f->tensors[f->n];
        if ((rc = s_parse_tensor(f, key, val, data_start, data_len, t, err, errlen)) != MM_OK)
            goto out;
        if (!(f->names[f->n] = strdup(key))) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", f->path);
            goto out;
        }
        t->name = f->names[f->n];
        f->n++;
    }
    /* No two tensors may share bytes: sort by offset, compare neighbours.
     * Empty tensors occupy nothing and overlap nothing. */
    if (f->n > 1) {
        mm_st_tensor **by_off = malloc(f->n * sizeof *by_off);
        if (!by_off) {
            rc = mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", f->path);
            goto out;
        }
        for (size_t i = 0; i < f->n; i++)
            by_off[i] = &f->tensors[i];
        qsort(by_off, f->n, sizeof *by_off, s_cmp_tensor_offset);
        const mm_st_tensor *prev = NULL;
        for (size_t i = 0; i < f->n; i++) {
            const mm_st_tensor *t = by_off[i];
            if (t->nbytes == 0)
                continue;
            if (prev && prev->file_offset + prev->nbytes > t->file_offset) {
                rc =
                    mm_errorf(err, errlen, MM_EPROTO,
                              "%s: tensors '%s' and '%s' overlap (data_offsets [%zu, %zu) and "
                              "[%zu, %zu))",
                              f->path, prev->name, t->name, prev->file_offset - data_start,
                              prev->file_offset - data_start + prev->nbytes,
                              t->file_offset - data_start, t->file_offset - data_start + t->nbytes);
                break;
            }
            prev = t;
        }
        free(by_off);
        if (rc != MM_OK)
            goto out;
    }
    qsort(f->tensors, f->n, sizeof *f->tensors, s_cmp_tensor_name);
out:
    json_decref(root);
    return rc;
}

int mm_st_open(const char *path, mm_st_file **out, char *err, size_t errlen) {
    *out = NULL;
    mm_st_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) {
        free(f);
        return mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", path);
    }
    int rc = MM_OK;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        rc = mm_errorf(err, errlen, errno == ENOENT ? MM_ENOTFOUND : MM_EIO, "%s: cannot open: %s",
                       path, strerror(errno));
        goto fail;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        rc = mm_errorf(err, errlen, MM_EIO, "%s: not a regular file", path);
        close(fd);
        goto fail;
    }
    if (st.st_size < 8) {
        rc = mm_errorf(err, errlen, MM_EPROTO,
                       "%s: file is %lld bytes, shorter than the 8-byte header length", path,
                       (long long)st.st_size);
        close(fd);
        goto fail;
    }
    if ((uint64_t)st.st_size > SIZE_MAX) {
        rc = mm_errorf(err, errlen, MM_EUNSUPPORTED, "%s: file too large to map", path);
        close(fd);
        goto fail;
    }
    f->size = (size_t)st.st_size;
    f->map = mmap(NULL, f->size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd); /* the mapping keeps the file referenced */
    if (f->map == MAP_FAILED) {
        f->map = NULL;
        rc = mm_errorf(err, errlen, MM_EIO, "%s: mmap failed: %s", path, strerror(errno));
        goto fail;
    }
    const uint8_t *b = f->map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | b[i]; /* little-endian, whatever the host */
    if (hlen > MM_ST_MAX_HEADER) {
        rc = mm_errorf(err, errlen, MM_EPROTO,
                       "%s: header length %" PRIu64 " is absurd (limit %" PRIu64 " bytes)", path,
                       hlen, MM_ST_MAX_HEADER);
        goto fail;
    }
    if (hlen > f->size - 8) {
        rc = mm_errorf(err, errlen, MM_EPROTO,
                       "%s: header length %" PRIu64 " runs beyond the file (%zu bytes)", path, hlen,
                       f->size);
        goto fail;
    }
    if ((rc = s_parse_header(f, (size_t)hlen, err, errlen)) != MM_OK)
        goto fail;
    *out = f;
    return MM_OK;
fail:
    mm_st_destroy(&f);
    return rc;
}

/* ==== lookups ============================================================= */

const char *mm_st_path(const mm_st_file *f) { return f->path; }
size_t mm_st_count(const mm_st_file *f) { return f->n; }

const mm_st_tensor *mm_st_at(const mm_st_file *f, size_t i) {
    return i < f->n ? &f->tensors[i] : NULL;
}

const mm_st_tensor *mm_st_find(const mm_st_file *f, const char *name) {
    mm_st_tensor key = {.name = name};
    return bsearch(&key, f->tensors, f->n, sizeof *f->tensors, s_cmp_tensor_name);
}

const char *mm_st_metadata(const mm_st_file *f, const char *key) {
    for (size_t i = 0; i < f->nmeta; i++)
        if (strcmp(f->meta_keys[i], key) == 0)
            return f->meta_vals[i];
    return NULL;
}

size_t mm_st_metadata_count(const mm_st_file *f) { return f->nmeta; }

int mm_st_metadata_at(const mm_st_file *f, size_t i, const char **key, const char **value) {
    if (i >= f->nmeta)
        return MM_EINVAL;
    *key = f->meta_keys[i];
    *value = f->meta_vals[i];
    return MM_OK;
}

/* ==== checkpoints ========================================================= */

struct mm_checkpoint {
    char *path;                 /* directory (or file) as given             */
    mm_st_file **files;         /* one per shard, in open order             */
    size_t nfiles;              /* number of files                          */
    const mm_st_tensor **table; /* all tensors, sorted by name              */
    size_t n;                   /* number of tensors                        */
};

void mm_checkpoint_destroy(mm_checkpoint **pck) {
    if (!pck || !*pck)
        return;
    mm_checkpoint *ck = *pck;
    for (size_t i = 0; i < ck->nfiles; i++)
        mm_st_destroy(&ck->files[i]);
    free(ck->files);
    free(ck->table);
    free(ck->path);
    free(ck);
    *pck = NULL;
}

static int s_cmp_tensor_ptr_name(const void *a, const void *b) {
    return strcmp((*(const mm_st_tensor *const *)a)->name, (*(const mm_st_tensor *const *)b)->name);
}

static char *s_join(const char *dir, const char *name) {
    size_t n = strlen(dir) + strlen(name) + 2;
    char *s = malloc(n);
    if (s)
        snprintf(s, n, "%s/%s", dir, name);
    return s;
}

static int s_is_file(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* Open path and append it to ck->files. */
static int s_add_file(mm_checkpoint *ck, const char *path, mm_st_file **added, char *err,
                      size_t errlen) {
    mm_st_file **nf = realloc(ck->files, (ck->nfiles + 1) * sizeof *nf);
    if (!nf)
        return mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", path);
    ck->files = nf;
    mm_st_file *f;
    int rc = mm_st_open(path, &f, err, errlen);
    if (rc != MM_OK)
        return rc;
    ck->files[ck->nfiles++] = f;
    if (added)
        *added = f;
    return MM_OK;
}

/* Table = every tensor of every file; a name in two files is an error. */
static int s_table_from_files(mm_checkpoint *ck, char *err, size_t errlen) {
    size_t total = 0;
    for (size_t i = 0; i < ck->nfiles; i++)
        total += mm_st_count(ck->files[i]);
    ck->table = malloc((total ? total : 1) * sizeof *ck->table);
    if (!ck->table)
        return mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", ck->path);
    for (size_t i = 0; i < ck->nfiles; i++)
        for (size_t j = 0; j < mm_st_count(ck->files[i]); j++)
            ck->table[ck->n++] = mm_st_at(ck->files[i], j);
    qsort(ck->table, ck->n, sizeof *ck->table, s_cmp_tensor_ptr_name);
    for (size_t i = 1; i < ck->n; i++)
        if (strcmp(ck->table[i - 1]->name, ck->table[i]->name) == 0)
            return mm_errorf(err, errlen, MM_EPROTO, "%s: tensor '%s' is in both %s and %s",
                             ck->path, ck->table[i]->name, ck->table[i - 1]->file,
                             ck->table[i]->file);
    return MM_OK;
}

static int s_cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Every *.safetensors in dir, in name order, so the result never depends on
 * readdir order. */
static int s_open_loose(mm_checkpoint *ck, char *err, size_t errlen) {
    DIR *d = opendir(ck->path);
    if (!d)
        return mm_errorf(err, errlen, MM_EIO, "%s: cannot read directory: %s", ck->path,
                         strerror(errno));
    char **names = NULL;
    size_t n = 0;
    int rc = MM_OK;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        const char *ext = ".safetensors";
        size_t el = strlen(ext);
        if (len <= el || strcmp(de->d_name + len - el, ext) != 0)
            continue;
        char **nn = realloc(names, (n + 1) * sizeof *nn);
        if (!nn || !(nn[n] = strdup(de->d_name))) {
            names = nn ? nn : names;
            rc = mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", ck->path);
            break;
        }
        names = nn;
        n++;
    }
    closedir(d);
    if (rc == MM_OK && n == 0)
        rc = mm_errorf(err, errlen, MM_ENOTFOUND,
                       "%s: no model.safetensors, model.safetensors.index.json or *.safetensors",
                       ck->path);
    if (rc == MM_OK)
        qsort(names, n, sizeof *names, s_cmp_str);
    for (size_t i = 0; i < n && rc == MM_OK; i++) {
        char *p = s_join(ck->path, names[i]);
        rc = p ? s_add_file(ck, p, NULL, err, errlen)
               : mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", ck->path);
        free(p);
    }
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    return rc == MM_OK ? s_table_from_files(ck, err, errlen) : rc;
}

/* Sharded: model.safetensors.index.json names the shard of every tensor. */
static int s_open_index(mm_checkpoint *ck, const char *index_path, char *err, size_t errlen) {
    json_error_t jerr;
    json_t *root = json_load_file(index_path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return mm_errorf(err, errlen, MM_EPROTO, "%s: not valid JSON: %s (line %d)", index_path,
                         jerr.text, jerr.line);
    int rc = MM_OK;
    json_t *wm = json_is_object(root) ? json_object_get(root, "weight_map") : NULL;
    if (!json_is_object(wm)) {
        rc = mm_errorf(err, errlen, MM_EPROTO, "%s: no 'weight_map' object", index_path);
        goto out;
    }
    size_t cnt = json_object_size(wm);
    ck->table = malloc((cnt ? cnt : 1) * sizeof *ck->table);
    if (!ck->table) {
        rc = mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", index_path);
        goto out;
    }
    const char *name;
    json_t *v;
    json_object_foreach(wm, name, v) {
        if (!json_is_string(v)) {
            rc =
                mm_errorf(err, errlen, MM_EPROTO,
                          "%s: weight_map entry for tensor '%s' is not a string", index_path, name);
            goto out;
        }
        const char *shard = json_string_value(v);
        /* The index is untrusted too: a shard name must not leave the
         * checkpoint directory. */
        if (shard[0] == '\0' || strchr(shard, '/') || strstr(shard, "..")) {
            rc = mm_errorf(err, errlen, MM_EPROTO,
                           "%s: tensor '%s' maps to shard \"%s\", which is not a plain file name "
                           "in the directory",
                           index_path, name, shard);
            goto out;
        }
        mm_st_file *f = NULL;
        for (size_t i = 0; i < ck->nfiles && !f; i++) {
            const char *p = mm_st_path(ck->files[i]);
            size_t dl = strlen(ck->path);
            if (strcmp(p + dl + 1, shard) == 0)
                f = ck->files[i];
        }
        if (!f) {
            char *p = s_join(ck->path, shard);
            if (!p) {
                rc = mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", index_path);
                goto out;
            }
            if (!s_is_file(p)) {
                rc = mm_errorf(err, errlen, MM_ENOTFOUND,
                               "%s: shard %s of tensor '%s' does not exist", index_path, p, name);
                free(p);
                goto out;
            }
            rc = s_add_file(ck, p, &f, err, errlen);
            free(p);
            if (rc != MM_OK)
                goto out;
        }
        const mm_st_tensor *t = mm_st_find(f, name);
        if (!t) {
            rc = mm_errorf(err, errlen, MM_EPROTO,
                           "%s: tensor '%s' is mapped to %s, which does not hold it", index_path,
                           name, mm_st_path(f));
            goto out;
        }
        ck->table[ck->n++] = t;
    }
    qsort(ck->table, ck->n, sizeof *ck->table, s_cmp_tensor_ptr_name);
out:
    json_decref(root);
    return rc;
}

int mm_checkpoint_open(const char *path, mm_checkpoint **out, char *err, size_t errlen) {
    *out = NULL;
    mm_checkpoint *ck = calloc(1, sizeof *ck);
    if (!ck || !(ck->path = strdup(path))) {
        free(ck);
        return mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", path);
    }
    /* Strip trailing slashes so shard paths read "dir/file". */
    for (size_t l = strlen(ck->path); l > 1 && ck->path[l - 1] == '/'; l--)
        ck->path[l - 1] = '\0';
    int rc;
    struct stat st;
    if (stat(ck->path, &st) != 0) {
        rc = mm_errorf(err, errlen, errno == ENOENT ? MM_ENOTFOUND : MM_EIO, "%s: %s", ck->path,
                       strerror(errno));
    } else if (S_ISREG(st.st_mode)) {
        rc = s_add_file(ck, ck->path, NULL, err, errlen);
        if (rc == MM_OK)
            rc = s_table_from_files(ck, err, errlen);
    } else {
        char *idx = s_join(ck->path, "model.safetensors.index.json");
        char *single = s_join(ck->path, "model.safetensors");
        if (!idx || !single)
            rc = mm_errorf(err, errlen, MM_ENOMEM, "%s: out of memory", ck->path);
        else if (s_is_file(idx))
            rc = s_open_index(ck, idx, err, errlen);
        else if (s_is_file(single)) {
            rc = s_add_file(ck, single, NULL, err, errlen);
            if (rc == MM_OK)
                rc = s_table_from_files(ck, err, errlen);
        } else
            rc = s_open_loose(ck, err, errlen);
        free(idx);
        free(single);
    }
    if (rc != MM_OK) {
        mm_checkpoint_destroy(&ck);
        return rc;
    }
    *out = ck;
    return MM_OK;
}

const char *mm_checkpoint_path(const mm_checkpoint *ck) { return ck->path; }
size_t mm_checkpoint_count(const mm_checkpoint *ck) { return ck->n; }

const mm_st_tensor *mm_checkpoint_at(const mm_checkpoint *ck, size_t i) {
    return i < ck->n ? ck->table[i] : NULL;
}

const mm_st_tensor *mm_checkpoint_find(const mm_checkpoint *ck, const char *name) {
    if (!name)
        return NULL;
    mm_st_tensor key = {.name = name};
    const mm_st_tensor *kp = &key;
    const mm_st_tensor *const *hit =
        bsearch(&kp, ck->table, ck->n, sizeof *ck->table, s_cmp_tensor_ptr_name);
    return hit ? *hit : NULL;
}

size_t mm_checkpoint_file_count(const mm_checkpoint *ck) { return ck->nfiles; }

const mm_st_file *mm_checkpoint_file_at(const mm_checkpoint *ck, size_t i) {
    return i < ck->nfiles ? ck->files[i] : NULL;
}

const char *mm_checkpoint_metadata(const mm_checkpoint *ck, const char *key) {
    for (size_t i = 0; i < ck->nfiles; i++) {
        const char *v = mm_st_metadata(ck->files[i], key);
        if (v)
            return v;
    }
    return NULL;
}

/* ==== checked getter ====================================================== */

int mm_checkpoint_get(const mm_checkpoint *ck, const char *name, int ndim,
                      const size_t *expect_shape, const mm_st_tensor **out, char *err,
                      size_t errlen) {
    *out = NULL;
    const mm_st_tensor *t = mm_checkpoint_find(ck, name);
    if (!t)
        return mm_errorf(err, errlen, MM_ENOTFOUND, "tensor '%s' not found in %s",
                         name ? name : "(null)", ck->path);
    if (!t->usable)
        return mm_errorf(err, errlen, MM_EUNSUPPORTED,
                         "tensor '%s' in %s has dtype %s; only F32, F16 and BF16 can be computed "
                         "with",
                         name, t->file, mm_st_dtype_name(t->st_dtype));
    int bad = ndim > 0 && t->ndim != ndim;
    for (int i = 0; !bad && ndim > 0 && expect_shape && i < ndim; i++)
        bad = expect_shape[i] != MM_ANY_DIM && expect_shape[i] != t->shape[i];
    if (bad) {
        char have[128], want[128] = "";
        mm_st_shape_str(t, have, sizeof have);
        if (expect_shape) {
            size_t n = (size_t)snprintf(want, sizeof want, "[");
            for (int i = 0; i < ndim && n < sizeof want; i++) {
                if (expect_shape[i] == MM_ANY_DIM)
                    n += (size_t)snprintf(want + n, sizeof want - n, "%s*", i ? ", " : "");
                else
                    n += (size_t)snprintf(want + n, sizeof want - n, "%s%zu", i ? ", " : "",
                                          expect_shape[i]);
            }
            if (n < sizeof want)
                snprintf(want + n, sizeof want - n, "]");
        } else {
            snprintf(want, sizeof want, "%d dims", ndim);
        }
        return mm_errorf(err, errlen, MM_EPROTO, "tensor '%s' in %s has shape %s, expected %s",
                         name, t->file, have, want);
    }
    *out = t;
    return MM_OK;
}
