# Ferry minivm guest program (64-bit long mode, CPL 3, no stack, no IDT).
# Assembled with `as --64 program.S -o /tmp/p.o && objdump -d /tmp/p.o`;
# the bytes are embedded in src/guest.rs. Register contract (set by the host):
#   rdi = base GPA of this vCPU's share of the data region
#   rsi = pages (working-set: this vCPU's W pages; sweep/random: share pages)
#   r12 = GPA of this vCPU's counter (u64); [r12+8] counts page writes (every workload
#         but idle adds 1 per page it writes: the guest's speed, read by the host)
#   sweep:  r8 = TSC ticks per page, r10 = max lag in ticks
#   random: r8 = xorshift64 state, r9 = hot pages, r10 = hot threshold (0..=256)
#   dense:  r8 = words rewritten per page after the first round (BYTES / 8)
#   zipf:   r8 = TSC ticks per write, r9 = xorshift64 state, r10 = max lag in ticks,
#           r11 = levels (pages < 2^(levels-1) are picked by level, levels uniform)
# dense and zipf fill pages with a xorshift64 stream seeded by ((tag * GOLDEN) ^ gpa) | 1,
# tag = the round (dense) or the write's sequence number (zipf): see guest.rs, page_words.
    .intel_syntax noprefix
    .code64
idle:
    inc qword ptr [r12]
    out 0x80, al
    jmp idle
ws:
    mov rax, [r12]
ws_round:
    inc rax
    mov rcx, rsi
    mov rbx, rdi
ws_page:
    mov [rbx], rax
    inc qword ptr [r12+8]
    add rbx, 0x1000
    dec rcx
    jnz ws_page
    mov [r12], rax
    jmp ws_round
sweep:
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r9, rax
    xor ebx, ebx
sweep_loop:
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, r9
    jae sweep_due
    out 0x81, al
    jmp sweep_loop
sweep_due:
    mov rcx, rax
    sub rcx, r9
    cmp rcx, r10
    jbe sweep_write
    mov r9, rax
sweep_write:
    mov rax, rbx
    shl rax, 12
    add rax, rdi
    mov rcx, [r12]
    inc rcx
    mov [rax], rcx
    mov [r12], rcx
    inc qword ptr [r12+8]
    add r9, r8
    inc rbx
    cmp rbx, rsi
    jb sweep_loop
    xor ebx, ebx
    jmp sweep_loop
random:
    mov rax, r8
    shl rax, 13
    xor r8, rax
    mov rax, r8
    shr rax, 7
    xor r8, rax
    mov rax, r8
    shl rax, 17
    xor r8, rax
    mov rax, r8
    movzx ecx, al
    shr rax, 8
    xor edx, edx
    cmp rcx, r10
    jb random_hot
    div rsi
    jmp random_write
random_hot:
    div r9
random_write:
    shl rdx, 12
    add rdx, rdi
    inc r13
    mov [rdx], r13
    inc qword ptr [r12+8]
    test r13d, 0xfff
    jnz random
    inc qword ptr [r12]
    jmp random
dense:
    movabs r11, 0x9e3779b97f4a7c15
    mov rax, [r12]
dense_round:
    inc rax
    mov r13, rax
    imul r13, r11
    mov rcx, rsi
    mov rbx, rdi
dense_page:
    mov r15, r8
    cmp rax, 1
    jne dense_fill
    mov r15d, 512
dense_fill:
    mov rdx, rbx
    xor rdx, r13
    or rdx, 1
    mov r14, rbx
dense_word:
    mov r10, rdx
    shl r10, 13
    xor rdx, r10
    mov r10, rdx
    shr r10, 7
    xor rdx, r10
    mov r10, rdx
    shl r10, 17
    xor rdx, r10
    mov [r14], rdx
    add r14, 8
    dec r15
    jnz dense_word
    inc qword ptr [r12+8]
    add rbx, 0x1000
    dec rcx
    jnz dense_page
    mov [r12], rax
    jmp dense_round
zipf:
    movabs r15, 0x9e3779b97f4a7c15
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r13, rax
zipf_loop:
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, r13
    jae zipf_due
    out 0x81, al
    jmp zipf_loop
zipf_due:
    mov rcx, rax
    sub rcx, r13
    cmp rcx, r10
    jbe zipf_pick
    mov r13, rax
zipf_pick:
    add r13, r8
    mov rax, r9
    shl rax, 13
    xor r9, rax
    mov rax, r9
    shr rax, 7
    xor r9, rax
    mov rax, r9
    shl rax, 17
    xor r9, rax
    movzx eax, r9w
    xor edx, edx
    div r11
    mov ecx, edx
    mov rax, r9
    shr rax, 16
    mov ebx, 1
    shl rbx, cl
    dec rbx
    and rax, rbx
    xor edx, edx
    div rsi
    shl rdx, 12
    add rdx, rdi
    mov rbx, rdx
    mov r14, [r12]
    inc r14
    mov rdx, r14
    imul rdx, r15
    xor rdx, rbx
    or rdx, 1
    mov ecx, 512
zipf_word:
    mov rax, rdx
    shl rax, 13
    xor rdx, rax
    mov rax, rdx
    shr rax, 7
    xor rdx, rax
    mov rax, rdx
    shl rax, 17
    xor rdx, rax
    mov [rbx], rdx
    add rbx, 8
    dec rcx
    jnz zipf_word
    inc qword ptr [r12+8]
    mov [r12], r14
    jmp zipf_loop
