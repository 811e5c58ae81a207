// fuzz_config.c: the config reader (src/config.c) on arbitrary bytes. The input is a JSON file, then optionally a
// NUL byte and `--set` overrides, one per line. A refusal says why in one line. An accepted config's effective JSON
// (what the run directory records) is itself an accepted config file that loads to the same effective JSON.
#include "config.h"
#include "fuzz.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char path[300], err[1024];
    const uint8_t *nul = memchr(data, 0, size);
    size_t json_len = nul ? (size_t)(nul - data) : size;
    fuzz_write(fuzz_path(path, sizeof path, "c.json"), data, json_len);
    // The overrides: the lines after the NUL (at most 16), each NUL-terminated in a copy.
    char *ov_text = NULL;
    const char *ov[16];
    int nov = 0;
    if (nul) {
        size_t n = size - json_len - 1;
        ov_text = malloc(n + 1);
        memcpy(ov_text, nul + 1, n);
        ov_text[n] = 0;
        for (char *s = ov_text; s && *s && nov < 16;) {
            ov[nov++] = s;
            char *e = strchr(s, '\n');
            if (e) *e++ = 0;
            s = e;
        }
    }
    Config cfg;
    err[0] = 0;
    if (config_load_err(&cfg, path, ov, nov, err, sizeof err) == 0) {
        char *j = config_to_json(&cfg);
        fuzz_write(path, (const uint8_t *)j, strlen(j));
        Config again;
        err[0] = 0;
        if (config_load_err(&again, path, NULL, 0, err, sizeof err) != 0) {
            fprintf(stderr, "the effective config was refused: %s\n%s\n", err, j);
            abort();
        }
        char *j2 = config_to_json(&again);
        if (strcmp(j, j2) != 0) {
            fprintf(stderr, "the effective config changed on reload:\n%s\n%s\n", j, j2);
            abort();
        }
        free(j2);
        free(j);
    } else if (!err[0] || strchr(err, '\n')) {
        fprintf(stderr, "a refusal must be one line: '%s'\n", err);
        abort();
    }
    free(ov_text);
    return 0;
}

#ifdef SD_FUZZ_STANDALONE
// Seeds (beside configs/*.json, which `make fuzz-seeds` copies): nested keys of each type, and overrides after a NUL.
int fuzz_write_seeds(const char *dir) {
    static const char a[] = "{\"model\": {\"arch\": \"simplevit\", \"dim\": 64, \"depth\": 2, \"heads\": 2},\n"
                            " \"opt\": {\"name\": \"shampoo\", \"lr\": 1e-3}, \"shampoo\": {\"root_delay\": 2, \"betas\": [0.9, 0.999]},\n"
                            " \"train\": {\"batch_size\": 8, \"label_smoothing\": 0.1}, \"run\": {\"device\": \"cpu\"}}";
    static const char b[] = "{\"data\": {\"dataset\": \"fashion-mnist\"}}\0model.arch=simplest\ntrain.lr=3e-4\n"
                            "shampoo.root_dtype=\"fp32\"\ndata.augment=true";
    char p[600];
    snprintf(p, sizeof p, "%s/nested.json", dir);
    fuzz_write(p, (const uint8_t *)a, sizeof a - 1);
    snprintf(p, sizeof p, "%s/overrides", dir);
    fuzz_write(p, (const uint8_t *)b, sizeof b - 1);
    return 0;
}
#endif
